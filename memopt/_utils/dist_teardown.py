"""Leaving ``torch.distributed`` together: barrier, then ``destroy_process_group``.

When one rank destroys its gloo process group and exits while a peer is still working (rank 0
writing a report or a checkpoint, say), the exiting rank can abort at interpreter shutdown
with ``terminate called without an active exception`` (SIGABRT), failing the whole launch
after training succeeded. Reproduced with plain torch 2.13 and gloo under ``torchrun``: two
ranks, a few all-reduces (world and a device-mesh subgroup), rank 0 sleeping 0-2 s before
``destroy_process_group``: 2 of 19 launches aborted (rank 0 0.5 s and 0 s late); with a
barrier first, none of 16 (0-0.2 s late). So on the normal path every rank meets at a
barrier first; after an error the barrier is skipped (the peers may never arrive) and the
group is only destroyed.

The barrier alone is not enough (core dumps of the aborts that remained, 4 of 50 launches of
an ad-hoc 2-rank stage-2 probe): gloo's barrier work keeps references to the works still in
its queue (memopt's last asynchronous broadcast or all-gather), and a gloo worker thread
destroys it after the barrier returns. Freeing those works' tensors needs the GIL; once the
main thread is in interpreter finalization the worker cannot take it, exits, and the unwind
through a noexcept destructor calls ``std::terminate``. (The group's worker threads are not
joined at ``destroy_process_group`` while memopt objects still reference the group.) So the
main thread then sleeps briefly, releasing the GIL while the worker finishes: 0 aborts in 55
launches.
"""

from __future__ import annotations

import time

import torch.distributed as dist

#: Seconds the main thread yields after the teardown (see the module docstring).
DRAIN_S = 0.2


def shutdown_distributed(*, ok: bool = True) -> None:
    """Destroy the default process group if one is up; ``ok=True`` (no error on this rank)
    first waits at a barrier so that no rank leaves while another is still running."""
    if not dist.is_initialized():
        return
    multi = dist.get_world_size() > 1
    try:
        if ok and multi:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        if multi:
            time.sleep(DRAIN_S)  # the gloo workers drop their last works now, GIL free
