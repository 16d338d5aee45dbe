"""Projectors regenerated from a seed: Gaussian, orthonormal random, columns, coordinates.

Their state is a seed (``proj_seed``, a plain int, the same on every rank) and the
matrix's shape (``proj_rows``, ``proj_cols``: ints; older checkpoints' ``proj_shape`` list
still loads): the matrix or index set is rebuilt from them on demand and kept in
``cache_*`` entries, which ``state_dict()`` leaves out. A resumed optimizer regenerates
exactly the same matrix.

The Gaussian matrix is drawn on the parameter's device (a CUDA generator on a GPU: no
host-side draw and copy at each refresh), so it is the same on every rank of one device
type; CPU and CUDA generators give different streams. The other draws are small or rare
and come from a CPU generator.

- ``random`` (APOLLO): P has i.i.d. N(0, 1/r) entries; not orthonormal.
- ``orthogonal`` (FRUGAL's "random"): the Q factor of a Gaussian matrix.
- ``columns`` (FRUGAL's "randperm", column/row selection): r random indices of the
  reduced side; projection is an index_select, the update an index_add.
- ``coordinate`` (FRUGAL's "randk"): k random entries of the whole matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from memopt.optim._functional import fp32_work, is_half
from memopt.optim.projection.base import Projector, seeded_shape
from memopt.optim.projection.dense import DenseProjector


def _store_shape(state: dict[str, Any], rows: int, cols: int) -> None:
    """The drawn matrix's shape as two ints (DESIGN.md 5.4: tensors and plain numbers)."""
    state["proj_rows"], state["proj_cols"] = rows, cols
    state.pop("proj_shape", None)


def _upgrade_shape(state: dict[str, Any]) -> None:
    """A loaded state of an older checkpoint (a ``proj_shape`` list) in today's form."""
    if "proj_rows" not in state and "proj_shape" in state:
        _store_shape(state, *_shape(state))


def _shape(state: dict[str, Any]) -> tuple[int, int]:
    shape = seeded_shape(state)
    if shape is None:
        raise RuntimeError("seeded projector used before update()")  # internal invariant
    return shape


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class _SeededDense(DenseProjector):
    uses_gradient = False

    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        state["proj_seed"] = int(seed)
        state["proj_right"] = self.side(tuple(grad.shape)) == "right"  # type: ignore[arg-type]
        _store_shape(state, int(grad.shape[0]), int(grad.shape[1]))
        self._materialize(state, grad.device, grad.dtype)

    def state_keys(self) -> tuple[str, ...]:
        return ("proj_seed",)

    def basis(self, state: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        if "cache_P" not in state:
            raise RuntimeError("seeded projector used before update()")  # internal invariant
        return state["cache_P"], state.get("cache_Q")

    def rebuild(self, state: dict[str, Any], like: Tensor) -> None:
        """Regenerate the cached matrix after a state_dict load."""
        _upgrade_shape(state)
        if "proj_seed" in state and "cache_P" not in state:
            self._materialize(state, like.device, like.dtype)

    def _materialize(self, state: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        m, n = _shape(state)
        r = self.rank_for((m, n))
        side = self.side((m, n))
        gen = _generator(state["proj_seed"], device if self.draw_on_device else "cpu")
        if side == "right":
            mats = [self._draw(gen, n, r).T]
        elif side == "left":
            mats = [self._draw(gen, m, r)]
        else:
            mats = [self._draw(gen, m, r), self._draw(gen, n, r).T]
        bdtype = self.options.get("basis_dtype") or dtype
        state["cache_P"] = mats[0].to(device=device, dtype=bdtype).contiguous()
        if len(mats) == 2:
            state["cache_Q"] = mats[1].to(device=device, dtype=bdtype).contiguous()

    draw_on_device = False

    def _draw(self, gen: torch.Generator, rows: int, r: int) -> Tensor:
        raise NotImplementedError


class GaussianProjector(_SeededDense):
    """APOLLO's random projection: entries N(0, 1/r), regenerated from the seed."""

    name = "random"
    orthonormal = False
    draw_on_device = True

    def _draw(self, gen: torch.Generator, rows: int, r: int) -> Tensor:
        return torch.randn(rows, r, generator=gen, device=gen.device).div_(math.sqrt(r))


class OrthogonalProjector(_SeededDense):
    """A uniformly random orthonormal basis (QR of a Gaussian matrix, signs fixed)."""

    name = "orthogonal"

    def _draw(self, gen: torch.Generator, rows: int, r: int) -> Tensor:
        q, rr = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(rr))).float()


class _SeededIndex(Projector):
    """Index-set projectors: state is the seed and shape; indices live in ``cache_key``."""

    uses_gradient = False
    cache_key = ""

    def state_keys(self) -> tuple[str, ...]:
        return ("proj_seed",)

    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        state["proj_seed"] = int(seed)
        _store_shape(state, int(grad.shape[0]), int(grad.shape[1]))
        self._materialize(state, grad.device)

    def rebuild(self, state: dict[str, Any], like: Tensor) -> None:
        _upgrade_shape(state)
        if "proj_seed" in state and self.cache_key not in state:
            self._materialize(state, like.device)

    def _materialize(self, state: dict[str, Any], device: torch.device) -> None:
        raise NotImplementedError

    def _decay_in_fp32(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float
    ) -> bool:
        """For a bf16 / fp16 ``out`` with a decay (``beta``): the whole write on an fp32 copy,
        rounded once (the decay multiplied on its own would round back to ``out``). Returns
        whether it ran."""
        if beta == 1.0 or not is_half(out):
            return False
        with fp32_work(out) as work:
            self.apply_update(state, low, work, alpha=alpha, beta=beta)
        return True


class ColumnProjector(_SeededIndex):
    """Random selection of r columns (right side) or rows (left side); ``both`` takes a block."""

    name = "columns"
    cache_key = "cache_rows"

    def _materialize(self, state: dict[str, Any], device: torch.device) -> None:
        m, n = _shape(state)
        r, side = self.rank_for((m, n)), self.side((m, n))
        gen = _generator(state["proj_seed"])
        full_rows, full_cols = torch.arange(m, device=device), torch.arange(n, device=device)
        pick_rows = torch.randperm(m, generator=gen)[:r].sort().values.to(device)
        pick_cols = torch.randperm(n, generator=gen)[:r].sort().values.to(device)
        state["cache_rows"] = full_rows if side == "right" else pick_rows
        state["cache_cols"] = full_cols if side == "left" else pick_cols

    def project(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        return grad.index_select(0, state["cache_rows"]).index_select(1, state["cache_cols"])

    def project_back(self, state: dict[str, Any], low: Tensor) -> Tensor:
        m, n = _shape(state)
        out = low.new_zeros(m, n)
        self.apply_update(state, low, out, alpha=1.0)
        return out

    def apply_update(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float = 1.0
    ) -> None:
        if self._decay_in_fp32(state, low, out, alpha=alpha, beta=beta):
            return
        if beta != 1.0:
            out.mul_(beta)
        rows, cols = state["cache_rows"], state["cache_cols"]
        m, n = _shape(state)
        low = low.to(out.dtype)
        if len(rows) == m:
            out.index_add_(1, cols, low, alpha=alpha)
        elif len(cols) == n:
            out.index_add_(0, rows, low, alpha=alpha)
        else:
            out[rows.unsqueeze(1), cols] += alpha * low


class CoordinateProjector(_SeededIndex):
    """k random entries of the matrix (``density`` of m * n); the low tensor is 1-D."""

    name = "coordinate"
    cache_key = "cache_idx"

    def rank_for(self, shape: tuple[int, int]) -> int:
        total = shape[0] * shape[1]
        if self.density is not None:
            return min(total, max(1, round(self.density * total)))  # 0 for an empty matrix
        assert self.rank is not None
        return min(total, self.rank * min(shape))  # rank r keeps as many entries as rank r

    def low_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:  # type: ignore[override]
        return (self.rank_for(shape),)

    def _materialize(self, state: dict[str, Any], device: torch.device) -> None:
        m, n = _shape(state)
        k = self.rank_for((m, n))
        idx = torch.randperm(m * n, generator=_generator(state["proj_seed"]))[:k].sort().values
        state["cache_idx"] = idx.to(device)

    def project(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        return grad.reshape(-1).index_select(0, state["cache_idx"])

    def project_back(self, state: dict[str, Any], low: Tensor) -> Tensor:
        m, n = _shape(state)
        out = low.new_zeros(m, n)
        self.apply_update(state, low, out, alpha=1.0)
        return out

    def apply_update(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float = 1.0
    ) -> None:
        if self._decay_in_fp32(state, low, out, alpha=alpha, beta=beta):
            return
        if beta != 1.0:
            out.mul_(beta)
        if out.is_contiguous():
            out.view(-1).index_add_(0, state["cache_idx"], low.to(out.dtype), alpha=alpha)
            return
        # another layout (a transposed parameter or gradient): the same flat (row-major)
        # entries, addressed as (row, column) pairs
        n = out.shape[1]
        idx = state["cache_idx"]
        out.index_put_((idx // n, idx % n), low.to(out.dtype) * alpha, accumulate=True)
