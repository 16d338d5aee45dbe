"""Projectors with a dense basis: SVD, randomized SVD, warm-started subspace iteration.

State keys: ``proj_P`` (the basis of the reduced side: r x n for a right projection,
m x r for a left one; for ``full``, the left basis m x r) and ``proj_Q`` (the right basis
r x n, ``full`` only). The basis is kept in the gradient's dtype, as galore-torch does,
unless ``basis_dtype`` says otherwise.

Projection and back-projection are single matmuls; ``apply_update`` fuses the
back-projection, the scale, the weight decay and the write into the parameter in one
``addmm_``, so no full-size update tensor is allocated.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from memopt.optim.projection.base import Projector, checked_float
from memopt.optim.projection.linalg import randomized_svd, thin_svd


class DenseProjector(Projector):
    """Shared projection arithmetic for projectors with explicit basis matrices."""

    def basis(self, state: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        return state["proj_P"], state.get("proj_Q")

    def state_keys(self) -> tuple[str, ...]:
        return ("proj_P", "proj_Q")

    def project(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        p, q = self.basis(state)
        side = self.side(tuple(grad.shape))  # type: ignore[arg-type]
        if side == "right":
            return grad @ p.T
        if side == "left":
            return p.T @ grad
        assert q is not None
        return p.T @ grad @ q.T

    def project_back(self, state: dict[str, Any], low: Tensor) -> Tensor:
        p, q = self.basis(state)
        if q is not None:
            return p @ low @ q
        return low @ p if self._right(state) else p @ low

    def _right(self, state: dict[str, Any]) -> bool:
        return bool(state.get("proj_right", True))

    def apply_update(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float = 1.0
    ) -> None:
        p, q = self.basis(state)
        if low.dtype != out.dtype or p.dtype != out.dtype:
            super().apply_update(state, low, out, alpha=alpha, beta=beta)
            return
        if q is not None:
            out.addmm_(p, low @ q, beta=beta, alpha=alpha)
        elif self._right(state):
            out.addmm_(low, p, beta=beta, alpha=alpha)
        else:
            out.addmm_(p, low, beta=beta, alpha=alpha)

    def change_of_basis(self, old: dict[str, Any], new: dict[str, Any]) -> list[Tensor]:
        """Right: low_new = low_old @ C with C = P_old P_new^T; left: C^T @ low_old."""
        po, qo = self.basis(old)
        pn, qn = self.basis(new)
        if qo is not None and qn is not None:
            return [pn.T @ po, qo @ qn.T]  # low_new = A @ low_old @ B
        if self._right(new):
            return [po @ pn.T]
        return [pn.T @ po]

    def store(self, state: dict[str, Any], grad: Tensor, u: Tensor, vh: Tensor) -> None:
        """Keep the factors this side needs, in the basis dtype."""
        dtype = self.options.get("basis_dtype") or grad.dtype
        side = self.side(tuple(grad.shape))  # type: ignore[arg-type]
        state["proj_right"] = side == "right"
        if side == "right":
            state["proj_P"] = vh.to(dtype)
        elif side == "left":
            state["proj_P"] = u.to(dtype)
        else:
            state["proj_P"], state["proj_Q"] = u.to(dtype), vh.to(dtype)


class SVDProjector(DenseProjector):
    """GaLore's projector: the top-r singular vectors from a full thin SVD."""

    name = "svd"

    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        g = checked_float(grad)
        u, vh = thin_svd(g, self.rank_for(tuple(g.shape)))  # type: ignore[arg-type]
        self.store(state, grad, u, vh)


class RandomizedSVDProjector(DenseProjector):
    """Randomized SVD (seeded, so identical on every rank); options oversample, power_iters."""

    name = "rsvd"

    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        g = checked_float(grad)
        r = self.rank_for(tuple(g.shape))  # type: ignore[arg-type]
        u, vh = randomized_svd(
            g,
            r,
            seed=seed,
            oversample=int(self.options.get("oversample", 8)),
            power_iters=int(self.options.get("power_iters", 2)),
        )
        self.store(state, grad, u, vh)


class SubspaceIterationProjector(DenseProjector):
    """Warm-started subspace iteration from the previous basis (``iters`` power steps).

    The first refresh has no previous basis and runs a randomized SVD.
    """

    name = "subspace"

    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        g = checked_float(grad)
        r = self.rank_for(tuple(g.shape))  # type: ignore[arg-type]
        iters = int(self.options.get("iters", 1))
        side = self.side(tuple(g.shape))  # type: ignore[arg-type]
        if "proj_P" not in state:
            u, vh = randomized_svd(g, r, seed=seed, power_iters=2)
        elif side == "left":
            # Left singular vectors of G are the right ones of G^T.
            v, uh = randomized_svd(g.T, r, seed=seed, power_iters=iters, init=state["proj_P"])
            u, vh = uh.T, v.T
        else:
            prev = state["proj_Q"] if side == "both" else state["proj_P"]
            u, vh = randomized_svd(g, r, seed=seed, power_iters=iters, init=prev.T)
        self.store(state, grad, u, vh)
