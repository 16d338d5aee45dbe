"""A load that the optimizer's own ``load_state_dict`` refuses changes nothing.

``restore_all`` used to copy the snapshot's weights into the model and only then call
``optimizer.load_state_dict``; a refusal raised there (a torch.optim snapshot without the
projector state a low-rank parameter needs, a torch feature memopt does not implement, a float
state of unknown dtype, torch's own group-size check) left the model with the snapshot's
weights and the optimizer with its old state: a user who caught the error trained on a silent
mix. A snapshot without scheduler state, loaded with ``scheduler=``, raised only after model and
optimizer were loaded. Every refusal now comes before anything changes. ``OffloadedAdamW``,
which takes its parameter as master when the saved state has none, still gets the snapshot's
weights although the optimizer now loads first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import memopt
from memopt.checkpoint import AsyncCheckpointer, SnapshotMismatchError
from memopt.offload import OffloadConfig, OffloadedAdamW
from memopt.optim import AdamW
from tests._harness.dist import run_distributed
from tests.checkpoint import _common as T


def _galore_like_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``_common``'s GaLore grouping (matrices, then the rest): the same parameter order."""
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": mats}, {"params": rest}]


def _galore(model: nn.Module) -> torch.optim.Optimizer:
    return T.make_optimizer("galore", model)


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    T.train(model, opt, sched, 0, steps)
    with AsyncCheckpointer(path, save_rng=False) as ckpt:
        ckpt.save(steps, model=model, optimizer=opt)


def _copy(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_copy(v) for v in x)
    return x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _trained(make_opt: Any, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A model and optimizer one step away from a fresh start (not the snapshot's weights)."""
    model = T.make_model().to(dtype)
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(7)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt.step()
    opt.zero_grad()
    return model, opt


def _refused_inside_load(path: Path, model: nn.Module, opt: Any, error: Any, match: str) -> None:
    """The load raises ``error`` from the optimizer's ``load_state_dict`` and changes nothing:
    weights, optimizer state and param groups bit for bit."""
    weights, state = _copy(model.state_dict()), _copy(opt.state_dict())
    with AsyncCheckpointer(path) as ckpt, pytest.raises(error, match=match) as info:
        ckpt.load(model=model, optimizer=opt)
    assert any(f.name == "load_state_dict" for f in info.traceback), "not the optimizer's own"
    assert T.equal(weights, model.state_dict()) == []
    assert _same(state, opt.state_dict())


def test_torch_adamw_snapshot_without_projector_state_into_galore(tmp_path) -> None:
    model = T.make_model()
    _save(tmp_path, model, torch.optim.AdamW(_galore_like_groups(model), lr=1e-2))
    model, opt = _trained(_galore)
    _refused_inside_load(tmp_path, model, opt, ValueError, "without memopt's projector state")


def test_torch_amsgrad_snapshot_into_memopt_adamw(tmp_path) -> None:
    model = T.make_model()
    _save(tmp_path, model, torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True))
    model, opt = _trained(lambda m: AdamW(m.parameters(), lr=1e-2))
    _refused_inside_load(tmp_path, model, opt, ValueError, "amsgrad=True asks for a feature")


def test_float_state_of_unknown_dtype_into_bf16_galore(tmp_path) -> None:
    """An fp32 run's state with a key memopt does not build, loaded into a bf16 model."""
    model = T.make_model()
    opt = _galore(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    T.train(model, opt, sched, 0, 2)
    opt.state[model.mid.weight]["extra_buffer"] = torch.zeros(3)
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(2, model=model, optimizer=opt)
    model, opt = _trained(_galore, torch.bfloat16)
    _refused_inside_load(tmp_path, model, opt, ValueError, "does not know which dtype")


def test_torch_group_sizes_differ(tmp_path) -> None:
    """torch's own check (plain torch optimizers): the same parameters split otherwise."""
    model = T.make_model()
    params = list(model.parameters())
    _save(tmp_path, model, torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}]))
    model, opt = _trained(
        lambda m: torch.optim.AdamW(
            [{"params": list(m.parameters())[:1]}, {"params": list(m.parameters())[1:]}]
        )
    )
    _refused_inside_load(tmp_path, model, opt, ValueError, "doesn't match the size")


def test_snapshot_without_scheduler_refuses_before_loading_anything(tmp_path) -> None:
    model = T.make_model()
    _save(tmp_path, model, _galore(model))
    model, opt = _trained(_galore)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    weights, state = _copy(model.state_dict()), _copy(opt.state_dict())
    with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(SnapshotMismatchError, match="holds no scheduler state"):
            ckpt.load(model=model, optimizer=opt, scheduler=sched)
    assert T.equal(weights, model.state_dict()) == []
    assert _same(state, opt.state_dict())


def test_offloaded_adamw_master_is_the_snapshot_weights(tmp_path) -> None:
    """A torch AdamW snapshot has no ``master``: OffloadedAdamW takes the parameter, which must
    be the loaded weights although the optimizer loads before the model copy."""
    model = T.make_model()
    _save(tmp_path, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt = _trained(
        lambda m: OffloadedAdamW(m.parameters(), lr=1e-2, offload=OffloadConfig(device="cpu"))
    )
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.load(model=model, optimizer=opt)
    for n, p in model.named_parameters():
        master, _, _ = opt.read_state(p)
        assert torch.equal(p.detach(), saved[n]), n
        assert torch.equal(master, saved[n].float()), n
    opt.close()


def _sharded(stage: int, make_opt: Any, **options: Any) -> tuple[nn.Module, Any]:
    model = T.make_model(0.0)
    return memopt.shard(model, make_opt(model), stage=stage, layout="dim0", **options)


def _torch_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_galore_like_groups(model), lr=1e-2)


def _sharded_loads(rank: int, world: int, root: str) -> dict[str, Any]:
    """Stages 2 and 3 (stage 1 shares stage 2's load): a sharded torch AdamW snapshot
    (GaLore's grouping) into a sharded GaLore is refused; stage 2 with ``offload=`` (an
    ``OffloadedAdamW`` inside) takes the loaded weights as masters."""
    out: dict[str, Any] = {}
    for stage in (2, 3):
        path = Path(root, f"s{stage}")
        _save(path, *_sharded(stage, _torch_adamw))
        model, opt = _sharded(stage, _galore)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        T.train(model, opt, sched, 10, 11, rank, world)
        weights, state = T.full_params(model), _copy(opt.state_dict())
        error = ""
        with AsyncCheckpointer(path) as ckpt:
            try:
                ckpt.load(model=model, optimizer=opt)
            except ValueError as e:
                error = str(e)
        out[f"s{stage}"] = (
            "without memopt's projector state" in error,
            T.equal(weights, T.full_params(model)),
            _same(state, opt.state_dict()),
        )
    saved = T.full_params(_sharded(2, _torch_adamw)[0])  # (the weights before training)
    model, opt = _sharded(2, _torch_adamw, offload="cpu")
    with AsyncCheckpointer(Path(root, "s2")) as ckpt:
        ckpt.load(model=model, optimizer=opt)
    masters = [torch.equal(opt.inner.read_state(t)[0], t.float()) for t in opt.locals.values()]
    out["offload"] = (T.equal(saved, T.full_params(model)) != [], masters)
    return out


def test_sharded_stages_refuse_without_touching_the_model(tmp_path) -> None:
    results = run_distributed(_sharded_loads, 2, timeout_s=240, args=(str(tmp_path),))
    for rank, res in enumerate(results):
        for stage in ("s2", "s3"):
            refused, changed, same_state = res[stage]
            assert refused, (rank, stage)
            assert changed == [], (rank, stage, changed)
            assert same_state, (rank, stage)
        loaded, masters = res["offload"]
        assert loaded and masters and all(masters), (rank, masters)
