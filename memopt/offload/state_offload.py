"""Any per-parameter optimizer's state on a storage tier, streamed one parameter at a time.

``StateOffloadedOptimizer(inner, tier)`` wraps an optimizer that can update one parameter at a
time (``inner.step_one(p)``: every memopt optimizer, GaLore / APOLLO / FRUGAL / Natural GaLore
and 8-bit states included) and keeps the tensors of ``inner.state[p]`` on ``tier`` (pinned
CPU arena or NVMe) between steps. The step walks the parameters that have a gradient in group
order, a small pipeline over them (the tier bookkeeping is ``memopt.offload.state_store``'s):

    fetch(p[i+1])  -- started before p[i] is updated, so its read overlaps the update
    wait fetch(p[i]); inner.step_one(p[i]); write_async(p[i]'s state)  -- overlaps the next
    after the write completes, p[i]'s state tensors shrink to empty placeholders

so at most ``prefetch + 1`` parameters' state is resident at once, plus the writes in flight
(at most ``max_writes``). State tensors smaller than ``min_bytes`` (step counters, scalars)
stay resident: moving them costs more than they weigh. Each (parameter, key) gets one tier
handle, allocated the first time it is written and reused (a key whose shape or dtype changes
gets a new one). ``state_dict()`` fetches everything back first, so it has the inner
optimizer's own layout and loads anywhere; ``load_state_dict`` loads into the inner optimizer
and writes the state out to the tier again.

The update of each parameter is ``inner.step_one(p)``, the same arithmetic as ``inner.step()``
for these optimizers (memopt runs its batched group update on a group of one); the order of the
parameters is the groups' order, as in ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memopt._utils.wrapped_optim import WrapperOptimizer, closure_loss
from memopt.offload.state_store import StateStore
from memopt.offload.tier import StorageTier, once_fixed

__all__ = ["StateOffloadedOptimizer"]


class StateOffloadedOptimizer(WrapperOptimizer):
    """``inner`` with its per-parameter state tensors kept on ``tier`` between updates."""

    _closed = False

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        tier: StorageTier,
        *,
        prefetch: int = 1,
        max_writes: int = 2,
        min_bytes: int = 4096,
    ) -> None:
        if not callable(getattr(inner, "step_one", None)):
            raise NotImplementedError(
                f"StateOffloadedOptimizer: {type(inner).__name__} has no step_one(p) to update "
                "one parameter at a time; use a memopt.optim optimizer (or OffloadedAdamW for "
                "torch.optim.AdamW)"
            )
        if prefetch < 0 or max_writes < 1 or min_bytes < 0:
            raise ValueError(
                f"StateOffloadedOptimizer: prefetch={prefetch} (>= 0), max_writes={max_writes} "
                f"(>= 1), min_bytes={min_bytes} (>= 0)"
            )
        self.wrap(inner)
        self.tier = tier
        self.prefetch, self.max_writes, self.min_bytes = prefetch, max_writes, min_bytes
        self.store = StateStore(inner, tier, min_bytes=min_bytes, max_writes=max_writes)
        self._owns_tier = False

    # -- what memopt.shard asks before a step (the inner optimizer answers) ---------------
    def is_low_rank(self, group: dict[str, Any]) -> bool:
        check = getattr(self.inner, "is_low_rank", None)
        return bool(check(group)) if check is not None else False

    def nonfinite_refresh(self) -> str | None:
        """The inner optimizer's ``nonfinite_refresh`` (gradients and step counters stay in
        memory, so nothing is read from the tier)."""
        check = getattr(self.inner, "nonfinite_refresh", None)
        return None if check is None else check()

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_open()
        loss = closure_loss(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for i, p in enumerate(params):
            try:
                if i == 0:
                    self.store.prefetch(params[: self.prefetch])
                if self.prefetch and i + self.prefetch < len(params):
                    self.store.prefetch([params[i + self.prefetch]])
                self.store.fetch([p])
            except OSError as e:
                raise _read_failed(e, i, len(params)) from e
            self.inner.step_one(p)  # type: ignore[attr-defined]
            try:
                self.store.send([p])
            except OSError as e:
                raise _write_failed(e) from e
        try:
            self.store.drain()
        except OSError as e:
            raise _write_failed(e) from e
        return loss

    # -- state_dict: the inner optimizer's layout ------------------------------------------
    def fetch_all(self) -> None:
        """Bring every offloaded tensor back (before reading the state)."""
        self._check_open()
        self.store.fetch_all()

    def offload_all(self) -> None:
        """Write every large state tensor out to the tier."""
        self._check_open()
        self.store.send_all()

    def state_dict(self) -> dict[str, Any]:
        self.fetch_all()
        try:
            return self.inner.state_dict()
        finally:
            self.offload_all()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fetch_all()
        self.inner.load_state_dict(state_dict)
        try:
            self.offload_all()
        except OSError as e:
            raise OSError(
                e.errno,
                f"{e.strerror or e}; StateOffloadedOptimizer.load_state_dict did not complete: "
                "part of the loaded state did not reach the tier. Load the state dict again "
                f"{once_fixed(e)}",
            ) from e

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def resident_bytes(self) -> int:
        """Bytes of state tensors held in memory now (not on the tier)."""
        return self.store.resident_bytes()

    def close(self) -> None:
        """Bring the state back into memory and free its tier handles (and the tier, if this
        optimizer created it). Stepping or reading the state afterwards is a RuntimeError;
        a second close does nothing."""
        if self._closed:
            return
        self.store.close(close_tier=self._owns_tier)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this StateOffloadedOptimizer was closed: its state is back in the inner "
                "optimizer (.inner) and its tier handles are freed; make a new one to step"
            )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "StateOffloadedOptimizer cannot be copied or pickled: its large state tensors "
            "live on a storage tier (pinned host memory or an NVMe file), not in the object, "
            "so a copy would have no state. Save opt.state_dict() (torch.save or memopt's "
            "AsyncCheckpointer) and load_state_dict() it into a new optimizer"
        )

    def __repr__(self) -> str:
        return f"StateOffloadedOptimizer({type(self.inner).__name__}, tier={self.tier.name})"


def _read_failed(err: OSError, done: int, total: int) -> OSError:
    """A failed read of parameter ``done``'s state: it changed nothing (the tier's copy and
    the placeholder stay), but the ``done`` parameters before it were updated."""
    if done == 0:
        what = "no parameter was updated, and the step can be retried"
    else:
        what = (
            f"{done} of {total} parameters were updated and the rest were not; retrying the "
            f"step would update those {done} again (skip it, or reload from the last "
            "checkpoint)"
        )
    return OSError(
        err.errno,
        f"{err.strerror or err}; StateOffloadedOptimizer.step did not complete: {what}. "
        "Every parameter's state on the tier is intact (the failed read changed nothing), so "
        "state_dict() and later steps read it again",
    )


def _write_failed(err: OSError) -> OSError:
    """A failed write: the parameter holds this step's values, its state on the tier not."""
    return OSError(
        err.errno,
        f"{err.strerror or err}; StateOffloadedOptimizer.step did not complete: some "
        "parameters may hold this step's values while their state on the tier does not, and "
        "the step counters have advanced. Do not retry the step: reload model and optimizer "
        f"from the last checkpoint {once_fixed(err)}",
    )
