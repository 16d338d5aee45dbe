"""Any per-parameter optimizer's state on a storage tier, streamed one parameter at a time.

``StateOffloadedOptimizer(inner, tier)`` wraps an optimizer that can update one parameter at a
time (``inner.step_one(p)``: every memopt optimizer, GaLore / APOLLO / FRUGAL / Natural GaLore
and 8-bit states included) and keeps the tensors of ``inner.state[p]`` on ``tier`` (pinned
CPU arena or NVMe) between steps. The step walks the parameters that have a gradient in group
order, a small pipeline over them:

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

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from memopt._utils.wrapped_optim import WrapperOptimizer, closure_loss
from memopt.offload.tier import IOFuture, StorageTier, TierHandle, wait_all

__all__ = ["StateOffloadedOptimizer"]

Key = tuple[int, str]  # (id(param), state key)


class StateOffloadedOptimizer(WrapperOptimizer):
    """``inner`` with its per-parameter state tensors kept on ``tier`` between updates."""

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
        self._handles: dict[Key, TierHandle] = {}
        self._away: dict[Key, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._writes: deque[tuple[Tensor, IOFuture]] = deque()
        self._owns_tier = False

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        fetches: dict[int, list[IOFuture]] = {}
        for i in range(min(self.prefetch, len(params))):
            fetches[i] = self._fetch(params[i])
        for i, p in enumerate(params):
            ahead = i + self.prefetch
            if self.prefetch and ahead < len(params):
                fetches[ahead] = self._fetch(params[ahead])
            wait_all(fetches.pop(i, []) or self._fetch(p))
            self.inner.step_one(p)  # type: ignore[attr-defined]
            self._send(p)
        self._drain()
        return loss

    def _fetch(self, p: Tensor) -> list[IOFuture]:
        """Bring ``p``'s offloaded state tensors back (reads in flight; wait on the result)."""
        state = self.inner.state.get(p)
        if not state:
            return []
        futures = []
        for key in [k for k in state if (id(p), k) in self._away]:
            shape, dtype, device = self._away.pop((id(p), key))
            out = torch.empty(shape, dtype=dtype, device=device)
            futures.append(self.tier.read_async(self._handles[(id(p), key)], out))
            state[key] = out
        return futures

    def _send(self, p: Tensor) -> None:
        """Write ``p``'s large state tensors to the tier; they shrink once written."""
        state = self.inner.state.get(p, {})
        for key, t in list(state.items()):
            if not isinstance(t, Tensor) or t.numel() * t.element_size() < self.min_bytes:
                continue
            handle = self._handle((id(p), key), t)
            src = t.detach().contiguous()
            fut = self.tier.write_async(handle, src)
            self._away[(id(p), key)] = (t.shape, t.dtype, t.device)
            state[key] = t.new_empty(0)
            self._writes.append((src, fut))  # src stays alive until the write is done
            while len(self._writes) > self.max_writes:
                self._writes.popleft()[1].wait()

    def _handle(self, key: Key, t: Tensor) -> TierHandle:
        h = self._handles.get(key)
        if h is not None and (h.shape != tuple(t.shape) or h.dtype != t.dtype):
            self.tier.free(h)
            h = None
        if h is None:
            h = self._handles[key] = self.tier.allocate(tuple(t.shape), t.dtype)
        return h

    def _drain(self) -> None:
        wait_all([fut for _, fut in self._writes])
        self._writes.clear()

    def _all_params(self) -> Iterator[Tensor]:
        for g in self.param_groups:
            yield from g["params"]

    # -- state_dict: the inner optimizer's layout ------------------------------------------
    def fetch_all(self) -> None:
        """Bring every offloaded tensor back (before reading the state)."""
        self._drain()
        wait_all([f for p in self._all_params() for f in self._fetch(p)])

    def offload_all(self) -> None:
        """Write every large state tensor out to the tier."""
        for p in self._all_params():
            self._send(p)
        self._drain()

    def state_dict(self) -> dict[str, Any]:
        self.fetch_all()
        try:
            return self.inner.state_dict()
        finally:
            self.offload_all()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fetch_all()
        self.inner.load_state_dict(state_dict)
        self.offload_all()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def resident_bytes(self) -> int:
        """Bytes of state tensors held in memory now (not on the tier)."""
        return sum(
            t.numel() * t.element_size()
            for st in self.inner.state.values()
            for t in st.values()
            if isinstance(t, Tensor)
        )

    def close(self) -> None:
        self._drain()
        for h in self._handles.values():
            self.tier.free(h)
        self._handles.clear()
        if self._owns_tier:
            self.tier.close()

    def __repr__(self) -> str:
        return f"StateOffloadedOptimizer({type(self.inner).__name__}, tier={self.tier.name})"
