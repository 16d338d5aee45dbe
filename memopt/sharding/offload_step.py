"""The inner step of an offloaded ZeRO 1/2 optimizer, and the ranks' agreement after it.

With ``offload=`` the inner step (``OffloadedAdamW``'s pipeline, or a low-rank optimizer's
state streamed through ``StateOffloadedOptimizer``) reads and writes a storage tier, so it can
fail on one rank only: an NVMe file full (ENOSPC) or failing (EIO) on one node, a parameter
the pipeline refuses. The failed rank raised out of ``step()`` before the parameter gather
while the others went on into it and waited there for it until the process group's timeout
(30 minutes for gloo, 10 for NCCL), then failed with a transport error that did not say what
happened.

``step_inner`` runs the inner step and then ``agree.agree`` (one flag all-reduce; the error
texts only when some rank failed) before the gather, so every rank raises: the failed rank
its own error, the others an error naming it and its message. The other ranks' inner steps
completed: their parameter shards and optimizer state hold this step's update, which no rank
received, so the step cannot be retried; the message says to reload the last checkpoint.
Only with ``offload=`` and more than one rank: without a tier the extra all-reduce per step
buys nothing, and on one rank there is no one to wait.
"""

from __future__ import annotations

from typing import Any

from memopt.sharding import agree
from memopt.sharding.offload_optim import replaced

__all__ = ["step_inner"]

_WHAT = (
    "failed in their offloaded optimizer step, before the parameter gather (skipped on "
    "every rank). This rank's step completed: its parameter shards and optimizer state hold "
    "this step's update, which the other ranks did not receive, so the ranks are out of step "
    "and the step cannot be retried: reload model and optimizer from the last checkpoint. "
    "What failed"
)


def step_inner(sharded: Any) -> None:
    """``sharded.inner.step()``; with ``offload=`` on more than one rank, every rank raises
    if the inner step raised on any rank (see the module docstring)."""
    comm = sharded.comm
    if sharded.config.offload is None or comm.world == 1:
        sharded.inner.step()
    else:
        error: Exception | None = None
        try:
            sharded.inner.step()
        except Exception as e:  # noqa: BLE001 - every rank learns of it, then it is re-raised
            note = getattr(e, "add_note", None)  # (Python >= 3.11: shown under the traceback)
            if callable(note):
                note(
                    f"memopt.shard: every rank raises for this step (rank {comm.rank} failed); "
                    "ranks whose step completed hold an update the others lack: do not retry "
                    "the step, reload model and optimizer from the last checkpoint"
                )
            error = e
        agree.agree(comm, error, _WHAT)
    _note_step(sharded.inner)


def _note_step(stepping: Any) -> None:
    """Tell an LR scheduler made on the user's optimizer before ``memopt.shard`` that it
    stepped: the step ran in ``stepping`` (which replaced it, ``offload_optim.replaced``), so
    torch's step wrapper never ran, and the scheduler's first ``step()`` warned "Detected
    call of lr_scheduler.step() before optimizer.step()" (the schedule was right)."""
    user = replaced(stepping)
    if user is not None and hasattr(user.step, "_wrapped_by_lr_sched"):
        user.__dict__["_opt_called"] = True  # what torch's wrapper sets (LRScheduler reads it)

