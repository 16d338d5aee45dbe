"""AsyncCheckpointer over subgroups: its gloo groups are made by the subgroup's ranks alone.

4 gloo ranks. Two subgroups ({0, 1} and {2, 3}) each build a checkpointer with in-memory
redundancy at the same time, three times over (made, saved, closed and made again over the
same ranks): each publishes into its own directory what its own ranks saved, and no group is
left behind (the tier's own group leaked at close). Then {0, 1} alone builds one, and a
whole-world ``new_group`` still meets on every rank (before: the subgroup's
``dist.new_group`` calls moved only its ranks' group counter, and the next whole-world
``new_group`` hung; two subgroups at once shared one group name and crashed or published
into each other's snapshot). ``close()`` after ``dist.destroy_process_group()`` does nothing
(it raised "Invalid process group specified").

Refusals, before any collective and leaving no group: a subgroup this rank is not in, a
DeviceMesh (with the ``mesh.get_group(...)`` hint), a ``redundancy_group`` reaching outside
the checkpointer's ranks. A recovery that cannot rebuild names the lost ranks as ranks of the
checkpointer's group with their global ranks, and says which group the quoted redundancy
message counts in. All in one spawn of 4 ranks (starting 4 interpreters with torch costs
most of the test's time on 2 cores).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d as c10d

from memopt.checkpoint import AsyncCheckpointer, PeerRecoveryError, RedundancyConfig
from tests._harness.dist import run_distributed

RED = RedundancyConfig(mode="replicate", copies=1)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(8, 8)


def _groups() -> int:
    return len(c10d._world.pg_map)


def _subgroups(rank: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    g01, g23 = dist.new_group([0, 1]), dist.new_group([2, 3])  # every rank, the usual way
    mine, name = (g01, "a") if rank < 2 else (g23, "b")
    directory = os.path.join(root, name)
    model = _model(rank // 2)  # the two subgroups save different values
    before = _groups()
    for step in range(3):  # the same ranks make their groups again after destroying them
        with AsyncCheckpointer(directory, keep=1, fsync=False, process_group=mine,
                               redundancy=RED) as ck:  # fmt: skip
            ck.save(step, model=model)
            ck.wait()
            out[f"protected{step}"] = ck.stats.last.protected
    out["groups_left"] = _groups() - before
    fresh = _model(99)
    with AsyncCheckpointer(directory, process_group=mine) as ck:
        ck.load(model=fresh)
        out["steps"] = ck.steps()
    out["same"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(),
                                                          strict=True))  # fmt: skip
    with open(os.path.join(directory, "step_0000000002", "manifest.json")) as f:
        out["manifest_world"] = json.load(f)["world_size"]
    if rank < 2:  # one subgroup alone
        with AsyncCheckpointer(os.path.join(root, "c"), fsync=False, process_group=g01) as ck:
            ck.save(1, model=model)
    whole = dist.new_group()  # every rank: it must meet (it hung)
    x = torch.ones(1)
    dist.all_reduce(x, group=whole)
    out["sum"] = float(x)
    return out


def _raises(kind: type[BaseException], fn: Any) -> str:
    with pytest.raises(kind) as info:
        fn()
    return str(info.value)


def _refusals_and_recovery(rank: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    out: dict[str, Any] = {}
    g01, g123 = dist.new_group([0, 1]), dist.new_group([1, 2, 3])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    before = _groups()
    d = os.path.join(root, "x")  # (never made)
    if rank >= 2:
        out["not_member"] = _raises(ValueError, lambda: AsyncCheckpointer(d, process_group=g01))
    out["mesh"] = _raises(TypeError, lambda: AsyncCheckpointer(d, process_group=mesh))
    if rank == 1:  # its redundancy group reaches ranks 2 and 3, outside {0, 1}
        out["outside"] = _raises(ValueError, lambda: AsyncCheckpointer(
            d, process_group=g01, redundancy=RED, redundancy_group=g123))  # fmt: skip
    out["refusals_left"] = _groups() - before
    if rank == 0:
        return out
    # {1, 2, 3}: one save protected; global ranks 2 and 3 (checkpointer ranks 1 and 2) lose
    # their memory; with copies=1 rank 1's copy was on rank 2: it cannot be rebuilt
    model = _model(rank)
    d = os.path.join(root, "r")
    ck = AsyncCheckpointer(d, fsync=False, process_group=g123, redundancy=RED)
    ck.save(1, model=model)
    ck.wait()
    if rank == 1:
        ck = AsyncCheckpointer(d, fsync=False, process_group=g123, redundancy=RED, adopt=ck)
    else:
        ck.close()
        ck = AsyncCheckpointer(d, fsync=False, process_group=g123, redundancy=RED)
    out["recover"] = _raises(PeerRecoveryError, lambda: ck.recover(model=model))
    ck.close()
    return out


def _four_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    out = _subgroups(rank, os.path.join(root, "sub"))
    out.update(_refusals_and_recovery(rank, os.path.join(root, "err")))
    ck = AsyncCheckpointer(os.path.join(root, "d"), fsync=False)
    ck.save(1, model=_model(0))
    ck.wait()
    dist.barrier()
    dist.destroy_process_group()
    ck.close()  # every group is gone already: nothing to do, no error
    return out


def test_subgroups_refusals_and_rank_names(tmp_path) -> None:
    results = run_distributed(_four_ranks, world_size=4, timeout_s=240, args=(str(tmp_path),))
    for rank, out in enumerate(results):  # subgroups saving at once, then the whole job
        assert out["same"] and out["steps"] == [2] and out["manifest_world"] == 2, (rank, out)
        assert all(out[f"protected{s}"] for s in range(3)), (rank, out)
        assert out["groups_left"] == 0, (rank, out)
        assert out["sum"] == 4.0, (rank, out)
    assert sorted(os.listdir(tmp_path / "sub" / "c")) == ["step_0000000001"]
    for rank, out in enumerate(results):  # refusals, recovery errors
        assert out["refusals_left"] == 0, (rank, out)
        assert "2-D DeviceMesh" in out["mesh"] and "mesh.get_group('dp')" in out["mesh"], out
        if rank >= 2:
            assert f"(global rank {rank}) is not a member of process_group" in out["not_member"]
        if rank >= 1:
            msg = out["recover"]
            assert "lost ranks [1, 2] of the checkpointer's group (global ranks [2, 3])" in msg
            assert "rank 0 (global 1): cannot rebuild rank 1" in msg, msg
            assert "ranks of the redundancy group, whose global ranks are [1, 2, 3]" in msg, msg
    assert "global ranks [2, 3] outside the checkpointer's process group (global ranks [0, 1])" \
        in results[1]["outside"]  # fmt: skip
