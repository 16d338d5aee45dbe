"""Inputs the sharded optimizers cannot run correctly are refused clearly (memopt.sharding.guards,
comm), on every rank and before anything changes; where they are fine they keep working.

- torch.amp.GradScaler: stage 1 on 2 ranks skipped the step on the overflowing rank only (the
  ranks' collectives then fell out of step); stages 2/3 and master weights failed with torch's
  "No inf checks were recorded". On one process with layout="whole_tensor" and no master
  weights it keeps GradScaler's own semantics (an inf skips the step and halves the scale).
- a model already sharded with FSDP2's fully_shard: stages 1/2 failed at the first step.
- an unsharded optimizer's state_dict: "saved with sharding None".
- opt.resident_params() at stages 1/2 (docs/shard.md's pretrained-weights recipe).
- process_group=<DeviceMesh>: "Group DeviceMesh(...) is not registered".
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from tests._harness.dist import run_distributed
from tests.sharding import _train as T

ROOT = Path(__file__).resolve().parents[2]
SCALER = "GradScaler cannot drive this sharded optimizer.*bfloat16.*master_dtype"


def _params(model: nn.Module) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _loss(model: nn.Module, step: int, rank: int = 0) -> torch.Tensor:
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(100 * step + rank))
    return model(x.to(next(model.parameters()).dtype)).float().square().mean()


def _scaled_steps(model: nn.Module, opt: Any, inf_at: int) -> list[tuple[bool, float]]:
    """3 GradScaler steps, an inf gradient at step ``inf_at``: (params moved, scale) per step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    out = []
    for step in range(3):
        before = _params(model)
        hook = model[0].weight.register_hook(lambda g: g * float("inf")) if step == inf_at else None
        scaler.scale(_loss(model, step)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if hook is not None:
            hook.remove()
        out.append((not _equal(before, _params(model)), scaler.get_scale()))
    return out


# -- GradScaler --------------------------------------------------------------------------------
@pytest.mark.parametrize(("stage", "offload"), [(1, None), (2, None), (2, "cpu")])
def test_grad_scaler_keeps_its_semantics_on_one_process(stage: int, offload: str | None) -> None:
    ref_model = T.make_model()
    ref = _scaled_steps(ref_model, T.make_optimizer("adamw", ref_model), inf_at=1)
    assert ref == [(True, 16.0), (False, 8.0), (True, 8.0)]  # torch's semantics
    model = T.make_model()
    opt = T.make_optimizer("adamw", model)
    model, opt = memopt.shard(model, opt, stage=stage, layout="whole_tensor", offload=offload)
    assert _scaled_steps(model, opt, inf_at=1) == ref
    if offload is None:  # the plain path: the unsharded optimizer's bits
        assert _equal(_params(model), _params(ref_model))


@pytest.mark.parametrize("case", ["dim0", "master", "stage3"])
def test_grad_scaler_is_refused_on_one_process_where_it_cannot_work(case: str) -> None:
    # (each failed with torch's "No inf checks were recorded for this optimizer")
    model = T.make_model(torch.bfloat16 if case == "master" else torch.float32)
    opt = T.make_optimizer("adamw", model)
    kwargs: dict[str, Any] = {
        "dim0": {"stage": 2, "layout": "dim0"},
        "master": {"stage": 1, "layout": "whole_tensor", "master_dtype": torch.float32},
        "stage3": {"stage": 3},
    }[case]
    model, opt = memopt.shard(model, opt, **kwargs)
    before = _params(model)
    with pytest.raises(NotImplementedError, match=SCALER):
        _scaled_steps(model, opt, inf_at=-1)
    assert _equal(before, _params(model)) and not opt.state
    opt.zero_grad()  # without the scaler the same optimizer steps (nothing left behind)
    _loss(model, 0).backward()
    opt.step()
    assert not _equal(before, _params(model))


def _scaler_on_ranks(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for stage, layout, master in [
        (1, "whole_tensor", None),
        (1, "dim0", None),
        (2, "whole_tensor", None),
        (1, "whole_tensor", torch.float32),
        (3, "dim0", None),
    ]:
        model = T.make_model(torch.bfloat16 if master else torch.float32)
        opt = T.make_optimizer("adamw", model)
        model, opt = memopt.shard(model, opt, stage=stage, layout=layout, master_dtype=master)
        before = _params(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        # an overflow on rank 1 only: stage 1 used to skip the step on rank 1 alone
        hook = model[0].weight.register_hook(lambda g: g * float("inf")) if rank == 1 else None
        scaler.scale(_loss(model, 0, rank)).backward()
        try:
            scaler.step(opt)
            error = "stepped"
        except NotImplementedError as e:
            error = str(e)
        if hook is not None:
            hook.remove()
        unchanged = _equal(before, _params(model))
        opt.zero_grad()
        _loss(model, 1, rank).backward()  # the ranks still step together without a scaler
        opt.step()
        out[f"{stage}-{layout}-{master}"] = (error, unchanged, _params(model))
    return out


def test_grad_scaler_is_refused_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = _part(two_ranks, "scaler")
    for case in r0:
        for r in (r0, r1):
            error, unchanged, _ = r[case]
            assert re.search(SCALER, error, re.S), (case, error)
            assert unchanged, case
        assert _equal(r0[case][2], r1[case][2]), case


def test_nonfinite_refresh_message_does_not_recommend_grad_scaler() -> None:
    from memopt.sharding import optimizer, rowproj

    for module in (optimizer, rowproj):
        text = Path(module.__file__ or "").read_text()
        assert "GradScaler does" not in text, module.__name__


# -- a model already sharded with fully_shard, a DeviceMesh as the group ------------------------
def _already_sharded_and_meshes(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    for stage in (1, 2, 3):
        model = T.make_model()
        fully_shard(model)
        try:
            memopt.shard(model, torch.optim.AdamW(model.parameters(), lr=1e-2), stage=stage)
            out[f"dtensor{stage}"] = "accepted"
        except ValueError as e:
            out[f"dtensor{stage}"] = str(e)
    mesh = init_device_mesh("cpu", (world,))
    model = T.make_model()
    model, opt = memopt.shard(model, T.make_optimizer("adamw", model), stage=2, process_group=mesh)
    out["mesh1d_same_group"] = opt.comm.group is mesh.get_group() and opt.comm.world == world
    T.train(model, opt, rank, world)
    out["mesh1d_params"] = _params(model)
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    for name, group in (("mesh2d", mesh2), ("object", object())):
        model = T.make_model()
        try:
            memopt.shard(model, T.make_optimizer("adamw", model), process_group=group)
            out[name] = "accepted"
        except TypeError as e:
            out[name] = str(e)
    return out


def test_fully_sharded_model_and_device_mesh(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = _part(two_ranks, "dtensor_mesh")
    for r in (r0, r1):
        for stage in (1, 2, 3):  # refused by memopt.shard itself, on every rank
            assert re.search(
                rf"memopt.shard\(stage={stage}\): the model's parameters are already DTensors"
                r".*pass the model before fully_shard", r[f"dtensor{stage}"], re.S,
            ), r[f"dtensor{stage}"]  # fmt: skip
        assert r["mesh1d_same_group"]
        assert "2-D DeviceMesh" in r["mesh2d"] and "mesh['dp'].get_group()" in r["mesh2d"]
        assert "must be a torch.distributed ProcessGroup" in r["object"]
    assert _equal(r0["mesh1d_params"], r1["mesh1d_params"])


def test_stage3_dtensor_check_has_one_home() -> None:
    """One check, in setup (through guards), for every stage; fsdp.check_stage3 has none."""
    text = (ROOT / "memopt" / "sharding" / "fsdp.py").read_text()
    assert "already DTensors" not in text


# -- an unsharded state_dict -------------------------------------------------------------------
def _plain_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """One plain AdamW step, the same bits in the test process and in the ranks (one thread:
    LayerNorm's backward sums in another order with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = T.make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _loss(model, 7).backward()
        opt.step()
    finally:
        torch.set_num_threads(threads)
    return model, opt


def _same(a: Any, b: Any) -> bool:
    """Equal nested state dicts, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _held_state_matches(opt: Any, plain: torch.optim.Optimizer, rank: int) -> bool:
    """Every state tensor this rank holds equals its rows (or the whole) of the plain one."""
    params = [p for g in plain.param_groups for p in g["params"]]
    for p in opt.plans:
        if p.index not in opt.locals:
            continue
        mine, ref = opt.state[opt.locals[p.index]], plain.state[params[p.index]]
        s, e = p.row_range(rank)
        for k in ("exp_avg", "exp_avg_sq"):
            want = ref[k] if p.owner is not None else ref[k].reshape(p.rows, p.cols)[s:e]
            if not torch.equal(mine[k].reshape(want.shape), want):
                return False
    return True


def _load_plain(rank: int, world: int, root: str) -> dict[str, Any]:
    from memopt.checkpoint import AsyncCheckpointer

    snapshot = os.path.join(root, "snapshot")
    out = {}
    for stage, layout in ((1, "whole_tensor"), (2, "dim0"), (3, "dim0")):
        model = T.make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, sharded = memopt.shard(model, opt, stage=stage, layout=layout)
        _loss(model, 0, rank).backward()
        sharded.step()
        sharded.zero_grad()
        mine = copy.deepcopy(sharded.state_dict())
        _, plain = _plain_optimizer()
        errors = []
        for sd in (plain.state_dict(), {**mine, "sharding": {**mine["sharding"], "world_size": 4}}):
            try:
                sharded.load_state_dict(sd)
            except ValueError as e:
                errors.append(str(e))
        unchanged = _same(sharded.state_dict(), mine)
        with AsyncCheckpointer(snapshot) as ckpt:  # the route the message names
            ckpt.load(model=model, optimizer=sharded)
        out[f"{stage}-{layout}"] = (errors, unchanged, _held_state_matches(sharded, plain, rank))
    return out


def test_unsharded_state_dict_is_refused_naming_the_checkpointer(
    two_ranks: list[dict[str, Any]],
) -> None:
    # one process: refused too (its state_dict is tagged), nothing loaded
    _, plain = _plain_optimizer()
    model = T.make_model()
    model, sharded = memopt.shard(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    with pytest.raises(ValueError, match="no 'sharding' entry.*AsyncCheckpointer"):
        sharded.load_state_dict(plain.state_dict())
    assert not sharded.state
    with pytest.raises(TypeError, match="takes the dict"):
        sharded.load_state_dict([])  # type: ignore[arg-type]
    results = _part(two_ranks, "load_plain")
    for res in results:
        for case, (errors, unchanged, resharded) in res.items():
            assert len(errors) == 2, (case, errors)
            assert re.search(
                r"no 'sharding' entry: it comes from an unsharded optimizer"
                r".*nothing was loaded.*AsyncCheckpointer reshards",
                errors[0],
                re.S,
            )
            assert re.search(r"saved with sharding .*'world_size': 4.*nothing was loaded"
                             r".*AsyncCheckpointer", errors[1], re.S)  # fmt: skip
            assert unchanged, case
            assert resharded, case


# -- opt.resident_params() and the pretrained-weights recipe -----------------------------------
def _recipe() -> str:
    """docs/shard.md's "Pretrained or consolidated weights" code block, as written."""
    doc = (ROOT / "docs" / "shard.md").read_text()
    start = doc.index("Pretrained or consolidated weights")
    block = re.search(r"```python\n(.*?)```", doc[start:], re.S)
    assert block is not None
    return block.group(1)


def _run_recipe(rank: int, world: int, directory: str) -> dict[str, Any]:
    os.chdir(directory)  # the recipe reads "model.safetensors"
    code = _recipe()
    out = {}
    for stage, master in ((1, None), (2, None), (3, None), (1, torch.float32), (2, torch.float32)):
        dtype = torch.bfloat16 if master else torch.float32
        model = T.make_model(dtype)
        opt = T.make_optimizer("adamw", model)
        if master is not None:  # (the recipe's own call has no master_dtype)
            model, opt = memopt.shard(model, opt, stage=stage, master_dtype=master)
            run = code.replace("model, opt = memopt.shard(model, opt, stage=3)", "")
        else:
            run = code.replace("stage=3", f"stage={stage}")
        scope = {"memopt": memopt, "model": model, "opt": opt, "rank": rank}
        exec(run, scope)
        model, opt = scope["model"], scope["opt"]
        loaded = _params(model)
        _loss(model, 0, rank).backward()
        opt.step()  # from the loaded weights (master copies refreshed from them)
        out[f"{stage}-{master}"] = (loaded, _params(model))
    return out


def test_pretrained_weights_recipe_runs_at_every_stage(
    two_ranks: list[dict[str, Any]], fixtures: Path
) -> None:
    assert "with opt.resident_params():" in _recipe()
    full = _weights()
    one = run_distributed(_run_recipe, world_size=1, timeout_s=60, args=(str(fixtures),))
    for results in (one, _part(two_ranks, "recipe")):
        _check_recipe(results, full)
    # and on one process without a process group: the same no-op context
    model = T.make_model()
    _, opt = memopt.shard(model, T.make_optimizer("adamw", model), stage=2)
    with opt.resident_params():
        model.load_state_dict(full)


def _check_recipe(results: list[dict[str, Any]], full: dict[str, torch.Tensor]) -> None:
    for res in results:
        for case, (loaded, stepped) in res.items():
            want = [t.to(loaded[i].dtype) for i, t in enumerate(full.values())]
            assert _equal(loaded, want), case
            for a, b in zip(stepped, want, strict=True):  # one step of lr 1e-2 from them
                assert 0 < (a.float() - b.float()).abs().max() < 0.05, case
    for case in results[0]:
        assert _equal(results[0][case][1], results[-1][case][1]), case


# -- one 2-rank run for all of the above (starting 2 ranks costs ~6 s here) --------------------
def _weights() -> dict[str, torch.Tensor]:
    """The "pretrained" weights of the recipe: far from the initial ones every rank builds."""
    model = T.make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return {n: t.contiguous() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.safetensors for the recipe; a snapshot of a plain optimizer, written by one
    process (the route the unsharded-state_dict error names)."""
    from safetensors.torch import save_file

    from memopt.checkpoint import AsyncCheckpointer

    root = tmp_path_factory.mktemp("guards")
    save_file(_weights(), str(root / "model.safetensors"))
    plain_model, plain = _plain_optimizer()
    with AsyncCheckpointer(root / "snapshot") as ckpt:
        ckpt.save(1, model=plain_model, optimizer=plain)
    return root


_PARTS = {
    "scaler": lambda rank, world, root: _scaler_on_ranks(rank, world),
    "dtensor_mesh": lambda rank, world, root: _already_sharded_and_meshes(rank, world),
    "load_plain": _load_plain,
    "recipe": _run_recipe,
}


def _two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    """Every part, each one's exception kept as text (so one part's failure names itself)."""
    import traceback

    out: dict[str, Any] = {}
    for name, part in _PARTS.items():
        try:
            out[name] = part(rank, world, root)
        except Exception:
            out[name] = _Failed(traceback.format_exc())
    return out


class _Failed(str):
    """A part's traceback."""


@pytest.fixture(scope="module")
def two_ranks(fixtures: Path) -> list[dict[str, Any]]:
    return run_distributed(_two_ranks, world_size=2, timeout_s=150, args=(str(fixtures),))


def _part(results: list[dict[str, Any]], name: str) -> list[Any]:
    for rank, res in enumerate(results):
        if isinstance(res[name], _Failed):
            pytest.fail(f"rank {rank}, part {name!r}:\n{res[name]}")
    return [res[name] for res in results]
