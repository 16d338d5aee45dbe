"""memopt.setup on 2 gloo ranks with a plain nn.Module: ZeRO-2 from the config trains like the
1-rank run on the concatenated batch, and checkpoint + peer redundancy + resume work; stage 0
wraps in DDP. Also optimizer-in-backward on one process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import memopt
from memopt import Config
from tests._harness.dist import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _cfg(stage: int, directory: str | None = None, redundancy: str = "none") -> Config:
    return Config.from_dict({
        "model": {"device": "cpu"},
        "train": {"steps": 6},
        "optimizer": {"name": "adamw", "lr": 1e-2, "max_grad_norm": None, "schedule": "constant"},
        "sharding": {"stage": stage},
        "checkpoint": {"directory": directory, "redundancy": redundancy, "fsync": False},
    })  # fmt: skip


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)


def _steps(s: memopt.Setup, n: int, rank: int, world: int, first: int = 0) -> None:
    """``n`` steps on batches ``first ..`` (this rank's slice of each)."""
    for step in range(first, first + n):
        x, y = _data(step)
        per = x.shape[0] // world
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        nn.functional.mse_loss(s.model(xs), ys).backward()
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)


def _ranked(rank: int, world: int, root: str) -> list[dict]:
    return [_one(rank, world, stage, f"{root}/stage{stage}") for stage in (2, 0)]


def _one(rank: int, world: int, stage: int, directory: str) -> dict:
    s = memopt.setup(_model(), _cfg(stage, directory, "replicate"))
    kind = type(s.model).__name__
    _steps(s, 3, rank, world)
    s.save(3)
    s.checkpointer.wait()  # the peers' copy is made in the background: wait for it
    held = s.redundancy.memory_bytes()
    s.close()
    again = memopt.setup(_model(), _cfg(stage, directory, "replicate"))
    _steps(again, 2, rank, world)
    weights = [p.detach().clone() for p in again.raw_model.parameters()]
    again.close()
    return {"kind": kind, "held": held, "resumed": again.resumed_from, "weights": weights}


def _reference(steps_before: int, steps_after: int) -> list[torch.Tensor]:
    s = memopt.setup(_model(), _cfg(0))
    _steps(s, steps_before, 0, 1)
    _steps(s, steps_after, 0, 1)  # same data order as resume-then-two-more-steps
    return [p.detach().clone() for p in s.model.parameters()]


def test_stage2_and_ddp_two_ranks_checkpoint_redundancy_resume() -> None:
    with tempfile.TemporaryDirectory() as d:
        out = run_distributed(_ranked, world_size=2, timeout_s=150, args=(d,))
    ref = _reference(3, 2)
    for per_rank in out:
        kinds = [r["kind"] for r in per_rank]
        assert kinds == ["Sequential", "DistributedDataParallel"]  # stage 2; stage 0 -> DDP
        for r in per_rank:
            assert r["resumed"] == 3 and r["held"] > 0
            for p, q in zip(r["weights"], ref, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_optimizer_in_backward(tmp_path: Path) -> None:
    cfg = Config.from_dict(
        {
            "model": {"device": "cpu"},
            "optimizer": {"in_backward": True, "max_grad_norm": 5.0},
            "checkpoint": {"directory": str(tmp_path), "fsync": False},
        }
    )
    s = memopt.setup(_model(), cfg)
    assert s.in_backward is not None and "inside backward" in s.describe()
    before = [p.detach().clone() for p in s.model.parameters()]
    x, y = _data(0)
    nn.functional.mse_loss(s.model(x), y).backward()  # the update happens here
    assert all(p.grad is None for p in s.model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, s.model.parameters(), strict=True))
    norm = s.in_backward.prev_norm
    assert norm is not None and norm > 0
    s.save(1)
    s.close()
    again = memopt.setup(_model(), cfg)  # the hooks' clipping state comes back with the step
    assert again.resumed_from == 1 and again.in_backward.prev_norm == pytest.approx(norm)
    again.close()


def _in_backward_on_ranks(rank: int, world: int) -> str:
    cfg = Config.from_dict({"model": {"device": "cpu"}, "optimizer": {"in_backward": True}})
    try:
        memopt.setup(_model(), cfg)
    except ValueError as e:
        return str(e)
    return "no error"


def test_optimizer_in_backward_is_refused_on_two_ranks() -> None:
    # each rank would update from its local gradient before DDP's all-reduce: ranks drift
    out = run_distributed(_in_backward_on_ranks, world_size=2, timeout_s=90)
    assert all("optimizer.in_backward" in msg and "drift" in msg for msg in out), out


def _process_group_kinds(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    s = memopt.setup(_model(), _cfg(2), process_group=mesh)
    out: dict = {"world": s.world_size, "same_group": s.optimizer.comm.group is mesh.get_group()}
    _steps(s, 2, rank, world)
    out["weights"] = [p.detach().clone() for p in s.raw_model.parameters()]
    s.close()
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    only0 = torch.distributed.new_group([0])  # (every rank calls new_group)
    for name, group in (("mesh2d", mesh2), ("non_member", only0)):
        if name == "non_member" and rank == 0:
            continue
        try:
            memopt.setup(_model(), _cfg(2), process_group=group)
            out[name] = "accepted"
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def test_process_group_may_be_a_1d_device_mesh() -> None:
    """memopt.setup takes what memopt.shard takes: a 1-D mesh trains as its group (it was a
    TypeError), a 2-D one names the dimension to pick, a group this rank is not in is refused."""
    r0, r1 = run_distributed(_process_group_kinds, world_size=2, timeout_s=90)
    for r in (r0, r1):
        assert r["world"] == 2 and r["same_group"]
        assert r["mesh2d"].startswith("TypeError: memopt.setup: process_group is a 2-D DeviceMesh")
    assert r1["non_member"].startswith("ValueError: memopt.setup: this process (global rank 1)")
    for a, b in zip(r0["weights"], r1["weights"], strict=True):
        assert torch.equal(a, b)  # ranks stay in step: the mesh's group is the one reduced over
