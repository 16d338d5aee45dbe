"""A model sharded with FSDP2's own ``fully_shard`` and a plain torch optimizer (no
``memopt.shard``): the optimizer's moments are DTensors. They are saved as their local
``Shard(0)`` rows, load back exactly (1 and 2 ranks on gloo), reshard 1 -> 2 and 2 -> 1 (into
a plain unsharded model too), and come back as DTensors like the parameters.

The old code handed those DTensors to the native copy (``data_ptr()`` 0): the rank died with
SIGSEGV. Every save of DTensor state runs in spawned ranks, so that shows as a ``RankError``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.checkpoint import AsyncCheckpointer, Snapshot, pipeline
from memopt.checkpoint.copy_crc import available, copy_crc32c
from tests._harness.dist import run_distributed
from tests.checkpoint import _common as T

K, N = 3, 5


def _fsdp2(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``_common.Net`` with every layer and the root under ``fully_shard``, torch AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = T.make_model(dropout=0.0)
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.inp, model.norm, model.mid, model.out):  # type: ignore[attr-defined]
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _save_run(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    """Train K, save to ``root``, train on to N: the full parameters at N."""
    model, opt = _fsdp2(world)
    _train(model, opt, 0, K, rank, world)
    with AsyncCheckpointer(root, keep=1) as ckpt:
        ckpt.save(K, model=model, optimizer=opt)
    _train(model, opt, K, N, rank, world)
    return T.full_params(model)


def _train(model: nn.Module, opt: Any, start: int, end: int, rank: int, world: int) -> None:
    per = T.BATCH // world
    for step in range(start, end):
        x, y = T.batch(step)
        out = model(x[rank * per : (rank + 1) * per])
        nn.functional.mse_loss(out, y[rank * per : (rank + 1) * per]).backward()
        opt.step()
        opt.zero_grad()


def _load_run(rank: int, world: int, src: str, again: str) -> dict[str, torch.Tensor]:
    """Fresh FSDP2 model and optimizer: load ``src``, check the state is DTensors like the
    parameters, save it again to ``again``, train on to N: the full parameters at N."""
    model, opt = _fsdp2(world)
    with AsyncCheckpointer(src) as ckpt:
        assert ckpt.load(model=model, optimizer=opt) == {}
    for p in model.parameters():
        st = opt.state[p]
        assert isinstance(st["step"], torch.Tensor) and float(st["step"]) == K
        for key in ("exp_avg", "exp_avg_sq"):
            v = st[key]
            assert type(v) is type(p) and v.placements == p.placements, key  # type: ignore[attr-defined]
            assert v.shape == p.shape and v.to_local().shape == p.to_local().shape, key  # type: ignore[attr-defined]
    with AsyncCheckpointer(again, keep=1) as ckpt:
        ckpt.save(K, model=model, optimizer=opt)
    _train(model, opt, K, N, rank, world)
    return T.full_params(model)


def _refusals(root: str) -> list[str]:
    """The native copy and an extra= DTensor refuse with a clear error (not a crash)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from memopt.checkpoint.copy_crc import has_own_memory

    d = distribute_tensor(torch.randn(6, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
    assert not has_own_memory(d)
    out = []
    if available():
        with pytest.raises(TypeError, match="src is a DTensor") as e:
            copy_crc32c(torch.empty(96, dtype=torch.uint8), d)
        out.append(str(e.value))
    with AsyncCheckpointer(root) as ckpt:
        with pytest.raises(TypeError, match="'extra.ema' is a DTensor") as e2:
            ckpt.save(1, extra={"ema": d})
        out.append(str(e2.value))
    return out


def _one_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    ref = _save_run(rank, world, os.path.join(root, "one", "a"))
    resumed = _load_run(rank, world, os.path.join(root, "one", "a"), os.path.join(root, "x"))
    return {"ref": ref, "resumed": resumed, "refusals": _refusals(os.path.join(root, "r"))}


def _two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    ref = _save_run(rank, world, os.path.join(root, "two", "a"))
    resumed = _load_run(rank, world, os.path.join(root, "two", "a"), os.path.join(root, "y"))
    grown = _load_run(rank, world, os.path.join(root, "one", "a"), os.path.join(root, "one", "b"))
    stage3 = _into_stage3(rank, world, root)
    return {"ref": ref, "resumed": resumed, "grown": grown, "stage3": stage3}


def _into_stage3(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    """The plain FSDP2 snapshot loads into memopt's own stage 3 (same torch AdamW inside)."""
    model = T.make_model(dropout=0.0)
    opt: Any = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, opt = memopt.shard(model, opt, stage=3)
    with AsyncCheckpointer(os.path.join(root, "two", "a")) as ckpt:
        ckpt.load(model=model, optimizer=opt)
    with AsyncCheckpointer(os.path.join(root, "two", "s3"), keep=1) as ckpt:
        ckpt.save(K, model=model, optimizer=opt)
    _train(model, opt, K, N, rank, world)
    return T.full_params(model)


def _same_consolidated(a_dir: str, b_dir: str) -> None:
    a = Snapshot(os.path.join(a_dir, f"step_{K:010d}"))
    b = Snapshot(os.path.join(b_dir, f"step_{K:010d}"))
    names = [sorted(n for n in s.blocks if n.startswith(("model.", "optim.")) and "@" not in n)
             for s in (a, b)]  # fmt: skip
    assert any(n.endswith(".exp_avg") for n in names[0]) and names[0] == names[1]
    for n in names[0]:
        assert torch.equal(a.full(n), b.full(n)), n


@pytest.mark.timeout(180)
def test_fsdp2_torch_optimizer_saves_loads_and_reshards(tmp_path) -> None:
    one = run_distributed(_one_rank, 1, timeout_s=120, args=(str(tmp_path),))[0]
    assert T.equal(one["ref"], one["resumed"]) == []  # exact resume at 1 rank
    assert len(one["refusals"]) == (2 if available() else 1)
    two = run_distributed(_two_ranks, 2, timeout_s=120, args=(str(tmp_path),))
    for r in range(2):
        assert T.equal(two[r]["ref"], two[r]["resumed"]) == [], r  # exact resume at 2 ranks
    # the manifest: each rank wrote its own Shard(0) rows of the moments (out: 5 rows, 3 + 2)
    snap = Snapshot(str(tmp_path / "two" / "a" / f"step_{K:010d}"))
    held = [
        next(p for p in snap.skeletons[r]["optimizer"]["params"] if p["name"] == "out.weight")
        for r in range(2)
    ]
    assert [p["rows"] for p in held] == [[0, 3], [3, 5]] and held[0]["row_sharded"]
    name = f"optim.{held[0]['index']}.exp_avg"
    assert [(o, r, tuple(t.shape)) for o, r, t in snap.blocks[name]] == [
        (0, 0, (3, 64)), (3, 1, (2, 64)),
    ]  # fmt: skip
    assert snap.shapes[name] == (5, 64)
    # into memopt.shard(stage=3): the same consolidated state, and the same training on
    _same_consolidated(str(tmp_path / "two" / "a"), str(tmp_path / "two" / "s3"))
    _close(two[0]["ref"], two[0]["stage3"])
    # 1 -> 2: the same consolidated state, and training on matches the 1-rank run
    _same_consolidated(str(tmp_path / "one" / "a"), str(tmp_path / "one" / "b"))
    _close(one["ref"], two[0]["grown"])
    _close(one["ref"], two[0]["ref"])
    # 2 -> 1 into a plain model and optimizer (no process group, no DTensors): consolidation
    model = T.make_model(dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    with AsyncCheckpointer(tmp_path / "two" / "a") as ckpt:
        ckpt.load(model=model, optimizer=opt)
    with AsyncCheckpointer(tmp_path / "two" / "b", keep=1) as ckpt:
        ckpt.save(K, model=model, optimizer=opt)
    _same_consolidated(str(tmp_path / "two" / "a"), str(tmp_path / "two" / "b"))
    _train(model, opt, K, N, 0, 1)
    _close(two[0]["ref"], T.full_params(model))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for n in a:  # 2 ranks and 1 process sum gradients in a different order
        torch.testing.assert_close(a[n], b[n], rtol=2e-4, atol=2e-5, msg=n)


class _Sub(torch.Tensor):
    """A tensor subclass over real memory: not plain, so torch copies it, not native code."""


def test_has_own_memory() -> None:
    """Only plain tensors over their own storage may reach native code; the check itself is
    pure Python (safe in this process)."""
    from memopt.checkpoint.copy_crc import has_own_memory

    t = torch.arange(12.0)
    assert has_own_memory(t) and has_own_memory(t[3:7]) and has_own_memory(nn.Parameter(t))
    assert has_own_memory(torch.zeros(0))
    assert not has_own_memory(t.as_subclass(_Sub))
    freed = torch.arange(12.0)
    freed.untyped_storage().resize_(0)  # FSDP2 frees unsharded parameters this way
    assert not has_own_memory(freed)


def test_subclass_source_is_copied_by_torch(tmp_path, monkeypatch) -> None:
    """A tensor subclass in extra= goes through torch's copy, never the native copy + CRC-32C
    (on by default), and loads back equal, checksum verified."""
    if not pipeline.fused_ok():
        pytest.skip("the native copy + CRC-32C is not built here")
    native: list[type] = []

    def seen(dst: torch.Tensor, src: torch.Tensor, previous: int) -> int:
        native.append(type(src))
        return copy_crc32c(dst, src, previous)

    monkeypatch.setattr(pipeline, "copy_crc32c", seen)
    sub = torch.randn(64, 8).as_subclass(_Sub)
    with AsyncCheckpointer(tmp_path, save_rng=False, checksum="crc32c") as ckpt:
        ckpt.save(1, extra={"s": sub, "p": torch.arange(10)})
        ckpt.wait()
        got = ckpt.load()
    assert torch.equal(got["s"], sub.as_subclass(torch.Tensor))
    assert torch.equal(got["p"], torch.arange(10))
    assert native and _Sub not in native and set(native) == {torch.Tensor}
