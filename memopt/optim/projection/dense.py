"""Projectors with a dense basis: SVD, randomized SVD, warm-started subspace iteration.

State keys: ``proj_P`` (the basis of the reduced side: r x n for a right projection,
m x r for a left one; for ``full``, the left basis m x r) and ``proj_Q`` (the right basis
r x n, ``full`` only). The basis is kept in the gradient's dtype, as galore-torch does,
unless ``basis_dtype`` says otherwise.

Projection and back-projection are single matmuls; ``apply_update`` fuses the
back-projection, the scale, the weight decay and the write into the parameter in one
``addmm_``, so no full-size update tensor is allocated.

``matmul_dtype="bfloat16"`` runs the projection GEMMs (and the back-projection) on bf16
copies of the gradient, the basis and the low-rank direction, with fp32 accumulation inside
the GEMM; the projected gradient comes back in the gradient's dtype, and the update is added
to the parameter in its own dtype. Moments and the basis stay as they are. On hardware with
native bf16 dot products (CPUs with AVX512-BF16 or AMX, GPU tensor cores) these GEMMs run
about 3x faster than in fp32; the price is bf16 rounding (relative 2^-9) of the projected
gradient and of the update, see docs/optim.md.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from memopt._utils import warn_once
from memopt.optim.projection.base import Projector, checked_float
from memopt.optim.projection.linalg import gram_eigh, randomized_svd, thin_svd


class DenseProjector(Projector):
    """Shared projection arithmetic for projectors with explicit basis matrices."""

    def basis(self, state: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        return state["proj_P"], state.get("proj_Q")

    def state_keys(self) -> tuple[str, ...]:
        return ("proj_P", "proj_Q")

    def matmul_dtype(self, x: Tensor) -> torch.dtype | None:
        """The dtype the GEMMs run in for operand ``x``, when it is not ``x``'s own."""
        name = self.options.get("matmul_dtype")
        if name is None:
            return None
        dtype = MATMUL_DTYPES[name]
        if x.dtype == dtype:
            return None
        if x.device.type == "cpu" and not cpu_has_bf16_gemm():
            warn_once(
                "matmul_dtype='bfloat16': this CPU has no native bf16 dot products (AVX512-BF16 "
                "or AMX), so bf16 GEMMs are emulated and slower than fp32; drop the option here"
            )
        return dtype

    def project(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        p, q = self.basis(state)
        side = self.side(_mat_shape(grad))
        md = self.matmul_dtype(grad)
        out_dtype = grad.dtype
        if md is not None:
            grad, p, q = grad.to(md), p.to(md), None if q is None else q.to(md)
        if side == "right":
            low = grad @ p.T
        elif side == "left":
            low = p.T @ grad
        else:
            assert q is not None
            low = p.T @ grad @ q.T
        return low if md is None else low.to(out_dtype)

    def project_back(self, state: dict[str, Any], low: Tensor) -> Tensor:
        """The full-size update; in ``matmul_dtype`` when that option is set."""
        p, q = self.basis(state)
        md = self.matmul_dtype(low)
        if md is not None:
            low, p, q = low.to(md), p.to(md), None if q is None else q.to(md)
        if q is not None:
            return p @ low @ q
        return low @ p if self._right(state) else p @ low

    def _right(self, state: dict[str, Any]) -> bool:
        return bool(state.get("proj_right", True))

    def apply_update(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float = 1.0
    ) -> None:
        p, q = self.basis(state)
        if self.matmul_dtype(out) is not None:  # a low-precision update, added at out's dtype
            from memopt.optim import kernels  # (kernels imports the optimizers' helpers)

            kernels.add_lowp_(out, self.project_back(state, low), alpha=alpha, beta=beta)
            return
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


MATMUL_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16}


@functools.cache
def cpu_has_bf16_gemm() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


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
