"""``step_in_backward`` refuses ``torch.amp.GradScaler`` with an error that says why.

The hooks update each parameter inside backward from its still-scaled gradient, before a
scaler could unscale it or skip an overflow step. ``scaler.step(optimizer)`` then found no
gradient left and failed with torch's bare "No inf checks were recorded for this optimizer"
(after the update had been applied with the scaled gradients, or NaN'd every weight on an
overflow). While the hooks are installed the optimizer says it handles scaling itself
(``_step_supports_amp_scaling``), so ``GradScaler.step`` calls ``optimizer.step()`` with its
``grad_scale`` / ``found_inf`` attributes set, and a step pre-hook raises
``NotImplementedError`` naming the fix. The flag is truthy only while the optimizer is marked
as driven by the hooks, so a copy of the optimizer (which has no hooks) does not carry it.
"""

from __future__ import annotations

from typing import Any

from memopt._utils.wrapped_optim import IN_BACKWARD, marked

_SCALER_ATTRS = ("grad_scale", "found_inf")


class _WhileHooked:
    """Truthy while ``optimizer`` has step_in_backward hooks (a deepcopy maps the reference
    to the copy, which is not marked)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def __bool__(self) -> bool:
        return marked(self.optimizer, IN_BACKWARD) is not None


def install(optimizer: Any) -> Any:
    """Set the flag and the refusing pre-hook; returns the hook's handle (``uninstall``)."""
    optimizer.__dict__["_step_supports_amp_scaling"] = _WhileHooked(optimizer)
    return optimizer.register_step_pre_hook(_refuse)


def uninstall(optimizer: Any, handle: Any) -> None:
    handle.remove()
    optimizer.__dict__.pop("_step_supports_amp_scaling", None)


def _refuse(optimizer: Any, args: Any, kwargs: Any) -> None:
    if not any(a in vars(optimizer) for a in _SCALER_ATTRS) or not marked(optimizer, IN_BACKWARD):
        return
    for a in _SCALER_ATTRS:  # (GradScaler deletes them only after a step that returned)
        vars(optimizer).pop(a, None)
    raise NotImplementedError(
        "step_in_backward does not combine with torch.amp.GradScaler: the hooks update each "
        "parameter inside backward from its still-scaled gradient, before the scaler can "
        "unscale it or skip an overflow step, so the updates already applied used gradients "
        "multiplied by the loss scale (and an overflow writes NaN/inf into the weights); "
        "reload the last checkpoint. Train in bf16 instead (torch.autocast(device_type, "
        "dtype=torch.bfloat16) needs no loss scaling) and drop the GradScaler, or call "
        "hooks.remove() and use scaler.step(optimizer) after backward as usual"
    )
