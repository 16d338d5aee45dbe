"""Tests of the distributed harness itself: results, error propagation, and hang detection."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests._harness.dist import RankError, run_distributed


def _all_reduce(rank: int, world_size: int, base: float) -> dict[str, object]:
    t = torch.tensor([base + rank, 10.0 * (rank + 1)])
    dist.all_reduce(t)
    return {
        "sum": t,
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "threads": torch.get_num_threads(),
    }


def _raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def _hang_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        while True:
            time.sleep(1)
    return rank


def test_all_reduce_returns_per_rank_values() -> None:
    out = run_distributed(_all_reduce, world_size=2, timeout_s=60, args=(1.0,))
    assert len(out) == 2
    for rank, res in enumerate(out):
        assert res["rank"] == rank
        assert res["world"] == 2
        torch.testing.assert_close(res["sum"], torch.tensor([3.0, 30.0]))
        assert res["omp"] == "1"
        assert res["threads"] == 1


def test_exception_on_rank1_propagates() -> None:
    with pytest.raises(RankError, match="rank 1 failed: ValueError: boom from rank 1") as info:
        run_distributed(_raise_on_rank1, world_size=2, timeout_s=60)
    assert info.value.rank == 1
    assert "_raise_on_rank1" in str(info.value)  # the remote traceback is in the message
    assert isinstance(info.value.__cause__, ValueError)


def test_hang_raises_timeout_naming_the_hung_rank() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] still running") as info:
        run_distributed(_hang_on_rank1, world_size=2, timeout_s=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 18, f"{elapsed=}"
    assert "_hang_on_rank1" in str(info.value)  # faulthandler stack of the hung rank


def test_unpicklable_fn_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda rank, world_size: rank)
