"""The subspace refresh schedule, batched refreshes and the moments policy.

A mixin of ``MemoptOptimizer`` (kept apart so each file holds one idea): which step
refreshes a parameter's projector, how same-shape refreshes due together are computed as
one batched call, and what happens to the moments when the subspace changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memopt.optim import _functional as F
from memopt.optim import _moments as moments
from memopt.optim.projection import Projector, mix_seed
from memopt.optim.projection.base import checked_float

CACHE_PREFIX = "cache_"
#: Largest stack of gradients one batched refresh may build (bytes).
MAX_BATCH_BYTES = 256 * 2**20


def _chunks(items: list[Any], max_bytes: int) -> list[list[Any]]:
    """Split (param, grad, state) triples into runs whose stacked grads stay under max_bytes."""
    out: list[list[Any]] = [[]]
    used = 0
    for item in items:
        size = item[1].numel() * 4
        if out[-1] and used + size > max_bytes:
            out.append([])
            used = 0
        out[-1].append(item)
        used += size
    return out


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite.

    One reduction pass first: a NaN or inf anywhere makes the sum non-finite. Only if the
    sum is not finite (that, or finite values whose sum overflows) does the elementwise
    check run, which is three passes and a temporary in torch.
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


class RefreshMixin:
    """Refresh bookkeeping; expects ``param_groups``, ``projector()``, ``_meta()`` and
    ``_init_state()`` from the optimizer it is mixed into."""

    _seed: int
    _prefetched: dict[int, tuple[Tensor, Tensor]]
    param_groups: list[dict[str, Any]]

    def projector(self, group: dict[str, Any]) -> Projector:
        raise NotImplementedError

    def grad_matrix(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def is_low_rank(self, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _meta(self) -> dict[int, Any]:
        raise NotImplementedError

    def _init_state(self, p: Tensor, group: dict[str, Any], m: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _refresh_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        if "proj_count" not in state:
            return True
        gap = group["update_proj_gap"]
        return state["step"] % gap == state.get("proj_phase", 0) % gap

    def nonfinite_refresh(self) -> str | None:
        """The name of a parameter whose projection refresh is due at the coming step and
        whose gradient has non-finite values (None: no such parameter). ``memopt.shard``
        asks every rank before stepping, so all of them refuse the step together (otherwise
        only the owner of that tensor raised, and the other ranks waited in the gather)."""
        meta = self._meta()
        for group in self.param_groups:
            if not self.is_low_rank(group):
                continue
            proj = self.projector(group)
            if proj is None or not getattr(proj, "refresh_reads_gradient", proj.uses_gradient):
                continue
            for p in group["params"]:
                if p.grad is None or p.dim() < 2:
                    continue
                state = self._init_state(p, group, meta[id(p)][1])
                if self._refresh_due(state, group) and not all_finite(p.grad):
                    return meta[id(p)][1].label
        return None

    def _prefetch_refreshes(self) -> None:
        """Compute this step's due refreshes in batches of same-shape matrices.

        The results wait in ``self._prefetched`` for ``refresh_if_due``. First, every due
        refresh's gradient is checked for non-finite values, so such a step raises before
        any parameter changes.
        """
        meta = self._meta()
        for group in self.param_groups:
            if not self.is_low_rank(group):
                continue
            proj = self.projector(group)
            if proj is None:  # (FRUGAL's block mode)
                continue
            batch = getattr(proj, "batchable", False)
            if not (batch or proj.uses_gradient):  # seeded: nothing to check or batch
                continue
            buckets: dict[tuple[Any, ...], list[tuple[Tensor, Tensor, dict[str, Any]]]] = {}
            for p in group["params"]:
                if p.grad is None or p.dim() < 2:
                    continue
                state = self._init_state(p, group, meta[id(p)][1])
                if self._refresh_due(state, group):
                    g = self.grad_matrix(p, group)
                    # before any parameter of the step changes (the docs: nothing is written)
                    self._check_finite(proj, g, state["step"], meta[id(p)][1].label)
                    if batch:
                        key = (tuple(g.shape), g.dtype, g.device)
                        buckets.setdefault(key, []).append((p, g, state))
            for items in buckets.values():
                for chunk in _chunks(items, MAX_BATCH_BYTES):
                    if len(chunk) > 1:
                        self._batch_factors(proj, chunk)

    def _batch_factors(self, proj: Any, chunk: list[tuple[Tensor, Tensor, dict[str, Any]]]) -> None:
        stack = torch.stack([checked_float(g) for _, g, _ in chunk])
        if not all_finite(stack):
            return
        seeds = [self._refresh_seed(st) for _, _, st in chunk]
        u, vh = proj.factors(stack, seeds, [st for _, _, st in chunk])
        for i, (p, _, _) in enumerate(chunk):
            self._prefetched[id(p)] = (u[i], vh[i])

    def _refresh_seed(self, state: dict[str, Any]) -> int:
        count = 0 if "proj_count" not in state else state["proj_count"] + 1
        return mix_seed(self._seed, state["index"], count)

    def refresh_if_due(
        self,
        p: Tensor,
        state: dict[str, Any],
        g: Tensor,
        group: dict[str, Any],
        label: str,
    ) -> bool:
        """Recompute the subspace when the schedule says so; apply the moments policy."""
        proj = self.projector(group)
        first = "proj_count" not in state
        if not self._refresh_due(state, group):
            return False
        old = {k: v for k, v in state.items() if k.startswith(("proj_", CACHE_PREFIX))}
        count = 0 if first else state["proj_count"] + 1
        pref = self._prefetched.pop(id(p), None)
        if pref is not None:
            proj.store(state, g, *pref)  # type: ignore[attr-defined]
        else:
            self._check_finite(proj, g, state["step"], label)
            proj.update(state, g, self._refresh_seed(state))
        state["proj_count"] = count
        if not first and moments.present(state):
            self._apply_moments_policy(state, proj, old, group)
        return True

    def _check_finite(self, proj: Projector, g: Tensor, step: int, label: str) -> None:
        if proj.uses_gradient and not all_finite(g):
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient of {label} has non-finite values at step "
                f"{step}; a {proj.name!r} projector cannot be computed from it. Skip such steps "
                "(torch.amp.GradScaler does) or clip/fix the loss."
            )

    def _apply_moments_policy(
        self, state: dict[str, Any], proj: Projector, old: dict[str, Any], group: dict[str, Any]
    ) -> None:
        policy = group.get("moments", "keep")
        if policy == "reset":
            moments.drop(state)
            state["moments_since"] = state["step"]
        elif policy == "rotate":
            like = torch.empty(state.get("moment_shape", [0]), device="meta")
            m, v = moments.load(state, state.get("exp_avg", like), group)
            change = proj.change_of_basis(old, state)
            m, v = F.rotate_moments_(m, v, change, bool(state.get("proj_right", True)))
            moments.store(state, m, v, group)
