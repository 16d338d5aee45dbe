"""Projectors with a dense basis: SVD, randomized SVD, warm-started subspace iteration.

State keys: ``proj_P`` (the basis of the reduced side: r x n for a right projection,
m x r for a left one; for ``full``, the left basis m x r) and ``proj_Q`` (the right basis
r x n, ``full`` only). The basis is kept in the gradient's dtype, as galore-torch does,
unless ``basis_dtype`` says otherwise.

Projection and back-projection are single matmuls; ``apply_update`` fuses the
back-projection, the scale, the weight decay and the write into the parameter in one
``addmm_``, so no full-size update tensor is allocated.

``matmul_dtype="bfloat16"`` lets the projection GEMMs use bf16 arithmetic (``lowp``: oneDNN's
bf16 math mode on the CPU, bf16 copies elsewhere); moments and the basis are unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from memopt.optim.projection import lowp
from memopt.optim.projection.base import Projector, checked_float
from memopt.optim.projection.linalg import gram_eigh, randomized_svd, thin_svd


class DenseProjector(Projector):
    """Shared projection arithmetic for projectors with explicit basis matrices."""

    def basis(self, state: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        return state["proj_P"], state.get("proj_Q")

    def state_keys(self) -> tuple[str, ...]:
        return ("proj_P", "proj_Q")

    def _route(self, x: Tensor) -> lowp.Route:
        return lowp.route(x, self.options.get("matmul_dtype"))

    def project(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        p, q = self.basis(state)
        side = self.side(_mat_shape(grad))
        r = self._route(grad)
        if r == "cast":
            bf16 = torch.bfloat16
            low = _project(grad.to(bf16), p.to(bf16), None if q is None else q.to(bf16), side)
            return low.to(grad.dtype)
        if r == "native" and grad.dim() == 2 and p.dtype == grad.dtype:
            return _project(grad, p, q, side, functools.partial(lowp.mm, r))
        with lowp.gemm_context(r):
            return _project(grad, p, q, side)

    def project_back(self, state: dict[str, Any], low: Tensor) -> Tensor:
        """The full-size update (in bf16 on the ``cast`` route of ``matmul_dtype``)."""
        p, q = self.basis(state)
        r = self._route(low)
        if r == "cast":
            low, p, q = low.bfloat16(), p.bfloat16(), None if q is None else q.bfloat16()
        if r == "native" and low.dim() == 2 and p.dtype == low.dtype:
            return _project_back(low, p, q, self._right(state), functools.partial(lowp.mm, r))
        with lowp.gemm_context(r):
            return _project_back(low, p, q, self._right(state))

    def _right(self, state: dict[str, Any]) -> bool:
        return bool(state.get("proj_right", True))

    def apply_update(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float = 1.0
    ) -> None:
        p, q = self.basis(state)
        r = self._route(out)
        if r == "cast" or low.dtype != out.dtype or p.dtype != out.dtype:
            super().apply_update(state, low, out, alpha=alpha, beta=beta)
            return
        if q is not None:
            lowp.addmm_(r, out, p, lowp.mm(r, low, q), beta=beta, alpha=alpha)
        elif self._right(state):
            lowp.addmm_(r, out, low, p, beta=beta, alpha=alpha)
        else:
            lowp.addmm_(r, out, p, low, beta=beta, alpha=alpha)

    def change_of_basis(self, old: dict[str, Any], new: dict[str, Any]) -> list[Tensor]:
        """Right: low_new = low_old @ C with C = P_old P_new^T; left: C^T @ low_old."""
        po, qo = self.basis(old)
        pn, qn = self.basis(new)
        if qo is not None and qn is not None:
            return [pn.T @ po, qo @ qn.T]  # low_new = A @ low_old @ B
        if self._right(new):
            return [po @ pn.T]
        return [pn.T @ po]

    def check_state(self, state: dict[str, Any], shape: tuple[int, int]) -> str | None:
        why = super().check_state(state, shape)
        if why is not None or "proj_P" not in state:
            return why
        r, side = self.rank_for(shape), self.side(shape)
        m, n = shape
        want = {"right": [("proj_P", (r, n))], "left": [("proj_P", (m, r))],
                "both": [("proj_P", (m, r)), ("proj_Q", (r, n))]}[side]  # fmt: skip
        for key, expect in want:
            got = state.get(key)
            if isinstance(got, Tensor) and tuple(got.shape) != expect:
                return f"{key} has shape {tuple(got.shape)}, expected {expect}"
        return None

    def store(self, state: dict[str, Any], grad: Tensor, u: Tensor, vh: Tensor) -> None:
        """Keep the factors this side needs, in the basis dtype."""
        dtype = self.options.get("basis_dtype") or grad.dtype
        side = self.side(_mat_shape(grad))
        state["proj_right"] = side == "right"
        # Always copy: u and vh are slices of the full factors (or of a batched stack),
        # and a view would keep the whole buffer alive next to the r rows it needs.
        if side == "right":
            state["proj_P"] = vh.to(dtype, copy=True)
        elif side == "left":
            state["proj_P"] = u.to(dtype, copy=True)
        else:
            state["proj_P"], state["proj_Q"] = u.to(dtype, copy=True), vh.to(dtype, copy=True)


Matmul = Callable[[Tensor, Tensor], Tensor]


def _project(
    grad: Tensor, p: Tensor, q: Tensor | None, side: str, mm: Matmul = torch.matmul
) -> Tensor:
    if side == "right":
        return mm(grad, p.T)
    if side == "left":
        return mm(p.T, grad)
    assert q is not None
    return mm(mm(p.T, grad), q.T)


def _project_back(
    low: Tensor, p: Tensor, q: Tensor | None, right: bool, mm: Matmul = torch.matmul
) -> Tensor:
    if q is not None:
        return mm(mm(p, low), q)
    return mm(low, p) if right else mm(p, low)


def _mat_shape(g: Tensor) -> tuple[int, int]:
    """The (m, n) of a matrix or of each matrix in a stack."""
    return int(g.shape[-2]), int(g.shape[-1])


class _FactorProjector(DenseProjector):
    """A dense projector whose basis comes from singular factors of the gradient.

    ``factors`` works on one matrix or a stack of same-shape matrices, which is what lets
    the optimizer batch refreshes (see ``MemoptOptimizer._prefetch_refreshes``).
    """

    batchable = True

    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        u, vh = self.factors(checked_float(grad), [seed], [state])
        self.store(state, grad, u, vh)

    def factors(
        self, g: Tensor, seeds: list[int], prev: list[dict[str, Any]]
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class SVDProjector(_FactorProjector):
    """GaLore's projector: the top-r singular vectors from a full thin SVD."""

    name = "svd"
    factor_basis = True

    def factors(
        self, g: Tensor, seeds: list[int], prev: list[dict[str, Any]]
    ) -> tuple[Tensor, Tensor]:
        return thin_svd(g, self.rank_for(_mat_shape(g)))


class GramProjector(_FactorProjector):
    """Exact top-r subspace from the eigenvectors of the reduced side's Gram matrix.

    Same subspace as ``svd`` (up to rotation within degenerate singular values), at a
    fraction of the cost: one GEMM and an eigensolve of min(m, n) x min(m, n). One-sided
    projections only.
    """

    name = "gram"

    def factors(
        self, g: Tensor, seeds: list[int], prev: list[dict[str, Any]]
    ) -> tuple[Tensor, Tensor]:
        shape = _mat_shape(g)
        side = self.side(shape)
        if side == "both":
            raise NotImplementedError("proj='gram' is one-sided; use 'svd' for proj_type='full'")
        return gram_eigh(g, self.rank_for(shape), side)


class RandomizedSVDProjector(_FactorProjector):
    """Randomized SVD (seeded, so identical on every rank); options oversample, power_iters."""

    name = "rsvd"
    factor_basis = True
    user_options = {"oversample": 0, "power_iters": 0}

    def factors(
        self, g: Tensor, seeds: list[int], prev: list[dict[str, Any]]
    ) -> tuple[Tensor, Tensor]:
        return randomized_svd(
            g,
            self.rank_for(_mat_shape(g)),
            seed=seeds,
            oversample=int(self.options.get("oversample", 8)),
            power_iters=int(self.options.get("power_iters", 2)),
        )


class SubspaceIterationProjector(_FactorProjector):
    """Warm-started subspace iteration from the previous basis (``iters`` power steps).

    The first refresh has no previous basis and runs a randomized SVD.
    """

    name = "subspace"
    factor_basis = True
    user_options = {"iters": 1}

    def factors(
        self, g: Tensor, seeds: list[int], prev: list[dict[str, Any]]
    ) -> tuple[Tensor, Tensor]:
        shape = _mat_shape(g)
        r = self.rank_for(shape)
        side = self.side(shape)
        if any("proj_P" not in st for st in prev):
            return randomized_svd(g, r, seed=seeds, power_iters=2)
        iters = int(self.options.get("iters", 1))
        key = "proj_Q" if side == "both" else "proj_P"
        bases = [st[key] for st in prev]
        old = bases[0] if g.dim() == 2 else torch.stack(bases)
        if side == "left":  # left singular vectors of G are the right ones of G^T
            v, uh = randomized_svd(g.mT, r, seed=seeds, power_iters=iters, init=old)
            return uh.mT, v.mT
        return randomized_svd(g, r, seed=seeds, power_iters=iters, init=old.mT)
