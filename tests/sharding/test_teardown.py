"""``shutdown_distributed``: no rank leaves while a peer still works; after an error, no wait."""

from __future__ import annotations

import time

import torch.distributed as dist

from memopt.sharding import shutdown_distributed
from tests._harness.dist import run_distributed

LATE_S = 1.5


def _leave(rank: int, world: int, ok: bool) -> tuple[float, float, bool]:
    """(when this rank called shutdown, when it returned, whether a group is still up)."""
    dist.barrier()
    if rank == 0:
        time.sleep(LATE_S)  # rank 0 is still busy (writing a report, say)
    entered = time.time()
    shutdown_distributed(ok=ok)
    return entered, time.time(), dist.is_initialized()


def test_ok_waits_for_the_slowest_rank() -> None:
    (entered0, _, up0), (entered1, left1, up1) = run_distributed(
        _leave, args=(True,), timeout_s=60
    )
    assert not up0 and not up1
    assert entered0 - entered1 > 0.5 * LATE_S  # rank 0 really came late
    assert left1 >= entered0  # rank 1 stayed until rank 0 arrived


def test_after_an_error_it_only_destroys() -> None:
    (entered0, _, _), (_, left1, up1) = run_distributed(_leave, args=(False,), timeout_s=60)
    assert left1 < entered0 and not up1  # rank 1 was gone before rank 0 got there


def test_without_a_group_is_a_no_op() -> None:
    shutdown_distributed()
    assert not dist.is_initialized()
