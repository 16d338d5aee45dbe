"""Optimizer-in-backward: update each parameter as soon as its gradient is complete.

``step_in_backward(model, optimizer)`` registers a post-accumulate-grad hook on every
trainable parameter. When a parameter's gradient for the last micro-batch of a step has
been accumulated, the hook clips it, calls ``optimizer.step_one(p)`` and frees it. The
model's gradients never all exist at once: peak gradient memory is about one parameter's
gradient instead of the whole model's.

Stream of events per optimizer step with ``accumulation_steps = N``::

    backward 1 .. N-1:  hooks only note which parameters got a gradient; .grad
                        accumulates as usual
    backward N:         hook(p): clip p.grad, optimizer.step_one(p), p.grad = None
    end of backward N:  (autograd engine callback) the same update for every parameter
                        optimizer.step() would update that no hook did: one with a
                        gradient from micro-batches 1 .. N-1 only (an MoE expert, a
                        skipped branch), or one of the optimizer's that had no hook (frozen
                        at install, unfrozen or added by add_param_group later: it gets its
                        hook now); then the step's grad norm is final, the step counter
                        advances

What the reference per-layer modes get wrong, and what happens here instead:

- Gradient accumulation: GaLore's per-layer script and HF's layer-wise mode step on
  every micro-batch. Here the hook counts completed backward passes (an engine callback
  at the end of each backward) and steps only on the N-th.
- Global-norm clipping: the true global norm is only known after the last hook, when
  the earlier parameters were already updated. ``clip="previous"`` (the default when
  ``max_grad_norm`` is set) scales every gradient of step t by
  ``min(1, max_grad_norm / norm_{t-1})``, the previous step's global norm (the first
  step is unclipped). The current step's true norm is measured as the hooks run and is
  reported in ``last_grad_norm`` (HF's layer-wise mode logs 0.0).
- LR schedulers: the optimizer is a real one; ``scheduler.step()`` after each step
  changes ``param_groups[i]["lr"]``, which the next hooks read.
- Checkpointing: the optimizer's ``state_dict`` holds the real state (HF's
  ``LayerWiseDummyOptimizer`` saves a dummy), and this object's ``state_dict`` holds the
  micro-batch counter and the previous norm, so a resumed run clips and accumulates
  exactly as the uninterrupted one. Save at a step boundary: between micro-batches the
  accumulated gradients are in no snapshot, and ``state_dict`` refuses (ValueError).

Calling ``optimizer.step()`` or ``zero_grad()`` as usual after a window's last backward is
harmless: the gradients are already gone. A window cut short (an epoch's last micro-batches)
is stepped with ``finish_window()``, which also realigns the counter (``in_backward_window``).
A second ``step_in_backward`` on an optimizer that has hooks is an error (``remove()`` the first
handle); a ``copy.deepcopy`` or pickle of it has no hooks and is free (the "driven in
backward" mark lives beside the optimizer, ``memopt._utils.wrapped_optim.mark``, not in its
``__dict__``). The optimizer's step pre-hooks run when the first
parameter of a step is about to be updated (an ``AsyncCheckpointer`` fences its copy to
host there; without it a snapshot taken between backwards could mix values from two
steps) and its post-hooks at the end of that backward; LR schedulers see the step as
taken. A parameter whose hook fires twice in one backward (a module used twice under
reentrant checkpointing) is an error (it leaves the handle usable). Not with an fp16
``GradScaler``: the hooks update with still-scaled gradients (use bf16); ``scaler.step``
raises ``NotImplementedError`` saying so (``in_backward_scaler``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor, nn

from memopt._utils.wrapped_optim import IN_BACKWARD, WRAPPED_BY, WrapperOptimizer, mark, marked
from memopt.offload.optimizer import OffloadedAdamW
from memopt.optim import in_backward_scaler, in_backward_window
from memopt.optim._base import MemoptOptimizer

ClipMode = Literal["previous"]


class StepInBackward:
    """Handle returned by :func:`step_in_backward`; ``remove()`` restores normal training."""

    def __init__(
        self,
        params: list[nn.Parameter],
        optimizer: MemoptOptimizer,
        accumulation_steps: int,
        max_grad_norm: float | None,
        clip: ClipMode,
    ) -> None:
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.clip = clip
        self.micro_step = 0  # completed backward passes
        self.steps = 0  # completed optimizer steps
        self.prev_norm: float | None = None
        self.last_grad_norm: float | None = None
        self._sq_norm: Tensor | None = None
        self._callback_queued = False
        self._stepped: set[int] = set()  # parameters updated in this backward
        # hooked parameters that got a gradient in an earlier micro-batch of this step
        self._pending: dict[int, Tensor] = {}
        self._handles: list[Any] = []
        self._hooked: set[int] = set()
        self._unhooked: tuple[Any, list[Tensor]] = (None, [])  # (groups signature, params)
        for p in params:
            self._install(p)
        # memopt.shard refuses it (see there). A mark beside the optimizer, not an attribute:
        # a deepcopy or pickle of the optimizer has no hooks, so it must not carry it.
        mark(optimizer, IN_BACKWARD, "step_in_backward")
        self._scaler_guard = in_backward_scaler.install(optimizer)  # (GradScaler: refused)

    def _install(self, p: Tensor) -> None:
        self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        self._hooked.add(id(p))

    # -- hooks ---------------------------------------------------------------------
    def _is_last_micro_batch(self) -> bool:
        return (self.micro_step + 1) % self.accumulation_steps == 0

    def _hook(self, p: Tensor) -> None:
        if not self._callback_queued:  # (the first hook of this backward: nothing done yet)
            refuse_several_ranks()  # (a process group set up after the hooks were installed)
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if p.grad is None:
            return
        if not self._is_last_micro_batch():
            self._pending[id(p)] = p
            return
        if id(p) in self._stepped:
            self._abort_backward()
            raise RuntimeError(
                "optimizer-in-backward: a parameter of shape "
                f"{tuple(p.shape)} received a second gradient in the same backward, after it "
                "was updated with the first: a module used twice under reentrant activation "
                "checkpointing (torch.utils.checkpoint(..., use_reentrant=True), which runs one "
                "backward per use). Use use_reentrant=False (HF: gradient_checkpointing_kwargs="
                "{'use_reentrant': False}); this step's update of that parameter is incomplete"
            )
        try:
            self._update(p)
        except BaseException:
            self._abort_backward()
            raise

    def _abort_backward(self) -> None:
        """An error ends this backward: the engine drops the queued end-of-backward callback,
        so forget this backward's bookkeeping here, or the next backward would be refused as
        a second gradient (and never queue its callback). The step stays uncounted."""
        self._callback_queued = False
        self._stepped.clear()
        self._sq_norm = None

    def _update(self, p: Tensor) -> None:
        """Clip ``p.grad``, count it in the step's norm, update ``p`` and free the gradient."""
        assert p.grad is not None
        if not self._stepped:  # the step begins: what optimizer.step() would run first
            run_step_hooks(self.optimizer, "pre")
        self._stepped.add(id(p))
        with torch.no_grad():
            sq = p.grad.detach().float().square().sum()
            self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq
            coef = self.clip_coefficient()
            if coef != 1.0:
                p.grad.mul_(coef)
            self.optimizer.step_one(p)
        p.grad = None

    def clip_coefficient(self) -> float:
        """The factor every gradient of this step is multiplied by before the update."""
        if self.max_grad_norm is None or self.prev_norm is None:
            return 1.0
        return min(1.0, self.max_grad_norm / (self.prev_norm + 1e-6))

    def _unhooked_params(self) -> list[Tensor]:
        """The optimizer's parameters without a hook (frozen when the hooks were installed,
        or added by ``add_param_group`` since), recomputed when the groups change."""
        groups = self.optimizer.param_groups
        sig = (tuple((id(g), len(g["params"])) for g in groups), len(self._hooked))
        if self._unhooked[0] != sig:
            params = [p for g in groups for p in g["params"] if id(p) not in self._hooked]
            self._unhooked = (sig, params)
        return self._unhooked[1]

    def _update_late(self) -> None:
        """At the end of a step's last backward: update what ``optimizer.step()`` would and
        no hook did, so the step (and its norm) equals the ordinary loop's."""
        late = [p for p in self._pending.values() if p.grad is not None]
        self._pending.clear()
        for p in list(self._unhooked_params()):
            if p.grad is not None:
                late.append(p)
                if p.requires_grad:  # unfrozen since install: hooked from the next step on
                    self._install(p)
        for p in late:
            self._update(p)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        if self._is_last_micro_batch():
            try:
                self._update_late()
            except BaseException:
                self._abort_backward()
                raise
        if self._is_last_micro_batch():
            self._close_step()
        self._stepped.clear()
        self.micro_step += 1

    def _close_step(self) -> None:
        """A step's end: the post-hooks (if it updated anything), its norm, the count."""
        if self._stepped:  # a step happened: what optimizer.step() would run last
            run_step_hooks(self.optimizer, "post")
            self.optimizer._opt_called = True  # type: ignore[attr-defined]  # (LR schedulers check)
        self._stepped.clear()
        self.last_grad_norm = self.prev_norm = in_backward_window.window_norm(self)
        self._sq_norm = None
        self.steps += 1

    def finish_window(self) -> bool:
        """After the last backward of a window cut short (an epoch's last micro-batches):
        step it and realign the counter (``in_backward_window``); False at a boundary."""
        return in_backward_window.finish_window(self)

    # -- lifecycle -----------------------------------------------------------------
    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooked.clear()
        self._pending.clear()
        self._unhooked = (None, [])
        mark(self.optimizer, IN_BACKWARD, None)
        in_backward_scaler.uninstall(self.optimizer, self._scaler_guard)

    def state_dict(self) -> dict[str, Any]:
        """The micro-batch counter, the step count and the previous norm. Only at a step
        boundary: between micro-batches the gradients accumulated so far are in ``.grad``,
        which no snapshot holds, and the restored counter would make the resumed run update
        on the remaining micro-batches' gradient alone."""
        done = self.micro_step % self.accumulation_steps
        if done:
            raise ValueError(
                f"optimizer-in-backward: state_dict() between micro-batches: {done} of the "
                f"{self.accumulation_steps} micro-batches of step {self.steps + 1} have run "
                f"(micro_step={self.micro_step}), and their accumulated gradients are in no "
                "snapshot, so a run resumed from it would update on part of the batch. Save "
                "at a step boundary: after the backward of a step's last micro-batch "
                f"(micro_step a multiple of accumulation_steps={self.accumulation_steps}), or "
                "after finish_window() for a window cut short (an epoch's last micro-batches); "
                "nothing was saved"
            )
        return {"micro_step": self.micro_step, "steps": self.steps, "prev_norm": self.prev_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_step = int(state["micro_step"])
        self.steps = int(state["steps"])
        self.prev_norm = None if state["prev_norm"] is None else float(state["prev_norm"])


def run_step_hooks(optimizer: torch.optim.Optimizer, when: Literal["pre", "post"]) -> None:
    """The step hooks ``optimizer.step()`` would run, in torch's order (pre: global ones
    first; post: the optimizer's first). An ``AsyncCheckpointer`` fences its copy in a pre-hook,
    before any state changes."""
    if when == "pre":
        hooks = (*_torch_optimizer._global_optimizer_pre_hooks.values(),
                 *optimizer._optimizer_step_pre_hooks.values())  # fmt: skip
    else:
        hooks = (*optimizer._optimizer_step_post_hooks.values(),
                 *_torch_optimizer._global_optimizer_post_hooks.values())  # fmt: skip
    for hook in hooks:
        hook(optimizer, (), {})


def step_in_backward(
    model: nn.Module | Iterable[nn.Parameter],
    optimizer: MemoptOptimizer,
    *,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    clip: ClipMode = "previous",
) -> StepInBackward:
    """Run ``optimizer``'s update inside the backward pass (see the module docstring).

    Every trainable parameter of ``model`` must belong to ``optimizer``.
    """
    _check_optimizer(optimizer)
    refuse_several_ranks()
    if marked(optimizer, IN_BACKWARD):
        raise ValueError(
            "step_in_backward: this optimizer already has optimizer-in-backward hooks from an "
            "earlier step_in_backward call whose handle was not removed; a second set would "
            "fight the first over each gradient. Call remove() on the handle that call "
            "returned first (a layer unfrozen later, or added with add_param_group, needs no "
            "new call: the installed hooks pick it up)"
        )
    if (
        isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int)
        or (accumulation_steps < 1)
    ):
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
        or not math.isfinite(max_grad_norm) or not max_grad_norm > 0
    ):
        raise ValueError(
            f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}"
        )
    if clip != "previous":
        raise ValueError(f"clip must be 'previous', got {clip!r}")
    params_iter = model.parameters() if isinstance(model, nn.Module) else model
    params = [p for p in params_iter if p.requires_grad]
    managed = optimizer._meta()
    if not params:
        raise ValueError(
            "step_in_backward: no trainable parameters given, so no update would ever run (a "
            "generator such as model.parameters() that the optimizer already consumed is "
            "empty); pass the model, or list(model.parameters())"
        )
    hooked = {id(p) for p in params}
    unhooked = [p for g in optimizer.param_groups for p in g["params"]
                if p.requires_grad and id(p) not in hooked]  # fmt: skip
    if unhooked:
        raise ValueError(
            f"step_in_backward: {len(unhooked)} trainable parameter(s) of the optimizer are not "
            f"among those given (shapes {[tuple(p.shape) for p in unhooked[:4]]}); they would "
            "never be updated, as backward() replaces optimizer.step(). Pass the whole model"
        )
    missing = [tuple(p.shape) for p in params if id(p) not in managed]
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameter(s) are not in the optimizer (shapes "
            f"{missing[:4]}); freeze them (requires_grad=False) or add them to a param group"
        )
    return StepInBackward(params, optimizer, accumulation_steps, max_grad_norm, clip)


def refuse_several_ranks() -> None:
    """Optimizer-in-backward is single-process: with several ranks each hook would update its
    parameter from this rank's local gradient (before DDP's all-reduce, when the model is
    wrapped in DDP), so the ranks drift apart without an error. ``memopt.shard`` and
    ``memopt.setup`` refuse it already; this catches a bare ``step_in_backward`` (under a plain
    HF ``Trainer`` on ``torchrun``, for one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and (n := dist.get_world_size()) > 1:
        raise ValueError(
            f"step_in_backward: torch.distributed runs {n} ranks here, but optimizer-in-"
            "backward is single-process: each rank would update its parameters from its own "
            "local gradient, before any all-reduce (DDP's included), and the ranks would drift "
            "apart. On several ranks call optimizer.step() after backward() (memopt.shard for "
            "sharded state), or run one process; nothing was updated"
        )


# The reason shared by every "driven elsewhere" refusal below (docs/guide.md, Optimizer-in-
# backward: it does not combine with sharding or offload).
_NO_COMBINE = (
    "(With several ranks each would step on its local gradient and the ranks drift apart; "
    "with offload the tier copy of the state would be stale.) Optimizer-in-backward does "
    "not combine with memopt.shard or optimizer-state offload: call the optimizer's step() "
    "after backward() as usual, or use step_in_backward with the plain memopt optimizer and "
    "without memopt.shard / offload"
)


def _check_optimizer(optimizer: Any) -> None:
    """Refuse what ``step_in_backward`` cannot drive, naming why: a memopt wrapper (what
    ``memopt.shard`` or state offload returns; recognised by the ``WrapperOptimizer`` base in
    ``memopt._utils``, so this layer never imports ``memopt.sharding``), an ``OffloadedAdamW``,
    the inner optimizer of a wrapper, or an optimizer that is not memopt's."""
    if isinstance(optimizer, WrapperOptimizer):
        inner = type(getattr(optimizer, "inner", None)).__name__
        raise ValueError(
            f"step_in_backward: got a {type(optimizer).__name__} (inner optimizer: {inner}), the "
            "optimizer memopt.shard or state offload returns; it reduces gradients across ranks "
            "and/or keeps the state on a tier, and updates the parameters in its step(). "
            f"Updates inside the backward would bypass it. {_NO_COMBINE}"
        )
    if isinstance(optimizer, OffloadedAdamW):
        raise ValueError(
            "step_in_backward: got an OffloadedAdamW, which keeps master weights and moments on "
            "a tier and updates them in a pipeline in step(); it has no per-parameter update "
            f"to run inside the backward. {_NO_COMBINE} (memopt.optim.AdamW is the in-memory "
            "one)"
        )
    if not isinstance(optimizer, MemoptOptimizer):
        raise TypeError(
            f"step_in_backward needs a memopt optimizer (memopt.optim.*), got "
            f"{type(optimizer).__name__}; memopt.optim.AdamW replaces torch.optim.AdamW"
        )
    wrapper = marked(optimizer, WRAPPED_BY)
    if wrapper is not None:
        raise ValueError(
            f"step_in_backward: this optimizer is now driven by a {wrapper} (memopt.shard or "
            "state offload), which reduces gradients across ranks and/or keeps the state on a "
            "tier, and updates the parameters in its step(). Updates inside the backward would "
            f"bypass it. The two do not combine. {_NO_COMBINE}"
        )
