"""``StepInBackward.finish_window()``: step an accumulation window cut short.

With ``accumulation_steps=N`` the hooks update on every N-th backward. An epoch whose number
of micro-batches is not a multiple of N ends with a partial window: its gradients sit in
``.grad`` (noted by the hooks as pending) and no backward will come to step them. Stepping
them by hand with ``optimizer.step()`` did update, but the hooks were not told: their
micro-batch counter stayed mid-window, so every later window straddled two of the user's
(the next epoch's first micro-batch was stepped alone) and ``state_dict()`` refused at every
step boundary of the user's loop. Leaving them was no better: the next window added them in.

``finish_window(hooks)`` does for the partial window what the end of a window's last backward
does: it updates every parameter holding a gradient that ``optimizer.step()`` would update
(clipped by the same previous-step coefficient; the optimizer's step hooks run around it),
records the window's norm, counts the step and moves the counter to the next window's start.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memopt.optim.in_backward import StepInBackward


def finish_window(hooks: StepInBackward) -> bool:
    """Step the partial window now; False (and nothing done) at a window boundary."""
    if hooks._callback_queued:
        raise RuntimeError(
            "optimizer-in-backward: finish_window() was called inside a backward (from a hook "
            "or an autograd function); call it after loss.backward() returned, once the last "
            "micro-batch of the partial window is done; nothing was updated"
        )
    done = hooks.micro_step % hooks.accumulation_steps
    if done == 0:
        return False
    try:
        hooks._update_late()
    except BaseException:
        hooks._abort_backward()
        raise
    hooks._close_step()
    hooks.micro_step += hooks.accumulation_steps - done
    return True


def window_norm(hooks: StepInBackward) -> float:
    """The norm of the step's gradients measured so far (0.0: none)."""
    return math.sqrt(float(hooks._sq_norm)) if hooks._sq_norm is not None else 0.0
