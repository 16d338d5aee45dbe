"""The ``Projector`` interface shared by every low-rank optimizer.

A projector maps a 2-D gradient G (m x n) to a smaller tensor and maps updates back.
It is a stateless strategy object built from a param group's options; everything that
changes during training (a basis, a seed, a refresh counter) lives as tensors or plain
numbers in the optimizer's per-parameter state dict, under keys that start with
``proj_``. Keys that start with ``cache_`` hold tensors that can be regenerated from
state (for example a seeded Gaussian matrix); they are dropped from ``state_dict()``.

Side selection is decided from the full gradient's shape, once, never from the shape of
the projected tensor (galore-torch's ``reverse_std`` decides it from the projected
shape in ``project_back`` and crashes on square projections):

- ``std``: project the smaller side: right (P is r x n, R = G P^T) if m >= n, else left
  (P is m x r, R = P^T G). The moments then have shape max(m, n) x r.
- ``reverse_std``: the opposite of ``std``.
- ``left`` / ``right``: forced.
- ``full``: both sides, R = P^T G Q^T is r x r.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from memopt._utils import warn_once
from memopt.optim._functional import is_half

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
Side = Literal["left", "right", "both"]
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")
#: Options the optimizer sets on its projectors itself (from matmul_dtype / the param dtype).
INTERNAL_OPTIONS = frozenset({"basis_dtype", "matmul_dtype"})

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64 steps).

    Used to derive a projection's seed from (optimizer seed, parameter index, refresh
    count), so every rank regenerates the same matrix without storing it.
    """
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def resolve_side(shape: tuple[int, int], proj_type: str) -> Side:
    """Which side of an m x n matrix a projection type reduces."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type  # type: ignore[return-value]
    if proj_type == "full":
        return "both"
    raise ValueError(f"unknown proj_type {proj_type!r}; choose one of: {', '.join(PROJ_TYPES)}")


def as_matrix(t: Tensor) -> Tensor:
    """View a tensor of 2 or more dims as a matrix (dim 0 x the rest), e.g. a conv kernel."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


@contextlib.contextmanager
def writable_matrix(p: Tensor) -> Iterator[Tensor]:
    """``p`` as an m x n matrix to update in place: a view when one exists, else (a
    channels_last conv weight, say) a contiguous copy written back into ``p`` on exit."""
    if p.dim() == 2:
        yield p
    elif p.is_contiguous():
        yield p.view(p.shape[0], math.prod(p.shape[1:]))
    else:
        w = as_matrix(p).clone()  # (reshape alone may return a view)
        yield w
        p.copy_(w.view(p.shape))


class Projector(ABC):
    """Strategy that projects gradients into a subspace and updates back.

    Subclasses set ``name`` (the string users pass, e.g. ``proj="svd"``) and
    ``orthonormal`` (whether the basis has orthonormal rows/columns, which the
    ``moments="rotate"`` policy needs).
    """

    name: ClassVar[str]
    orthonormal: ClassVar[bool] = True
    #: The ``proj_options`` this projector takes: name -> lowest allowed integer value.
    user_options: ClassVar[dict[str, int]] = {}
    #: Whether a refresh reads the gradient's values (then non-finite values are an error).
    uses_gradient: ClassVar[bool] = True
    #: Whether the basis is cut from the gradient's singular factors (``svd``, ``rsvd``,
    #: ``subspace``): an m x n matrix has min(m, n) of them, so ``rank_for`` caps there too.
    factor_basis: ClassVar[bool] = False

    def __init__(
        self,
        *,
        rank: int | None = None,
        density: float | None = None,
        proj_type: str = "std",
        **options: Any,
    ) -> None:
        if (rank is None) == (density is None):
            raise ValueError("give exactly one of rank=... or density=... for a projector")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if density is not None and not (0.0 < float(density) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        resolve_side((2, 1), proj_type)  # validates the name
        self._check_options(options)
        self.rank = rank
        self.density = density
        self.proj_type = proj_type
        self.options = options

    def _check_options(self, options: dict[str, Any]) -> None:
        """``proj_options`` a typo would otherwise drop silently (``oversampel``), or whose
        value would change the rank (a negative ``oversample``)."""
        takes = self.user_options
        unknown = sorted(set(options) - set(takes) - INTERNAL_OPTIONS)
        if unknown:
            listed = ", ".join(sorted(takes)) or "none"
            raise ValueError(f"proj_options {unknown} unknown for proj={self.name!r}; it takes: "
                             f"{listed}")  # fmt: skip
        for key, low in takes.items():
            value = options.get(key, low)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(
                    f"proj_options[{key!r}] of proj={self.name!r} must be an integer >= {low}, "
                    f"got {value!r}"
                )

    # -- shapes --------------------------------------------------------------------
    def side(self, shape: tuple[int, int]) -> Side:
        return resolve_side(shape, self.proj_type)

    def rank_for(self, shape: tuple[int, int]) -> int:
        """Rank used for a matrix of this shape: clamped to the side it reduces, and, for a
        basis cut from the gradient's singular factors (``factor_basis``), to min(m, n),
        the most singular vectors an m x n matrix has. Moments, the stored basis, the load
        check and ``state_bytes`` all follow this number."""
        side = self.side(shape)
        limit = {"right": shape[1], "left": shape[0], "both": min(shape)}[side]
        cap = min(limit, *shape) if self.factor_basis else limit
        if self.density is not None:
            r = min(limit, max(1, round(self.density * limit)))  # 0 for an empty side
            if r > cap:
                self._warn_clamp(f"density {self.density} ({r} directions)", shape, cap)
            return min(r, cap)
        assert self.rank is not None
        if self.rank > cap or (self.rank == limit and limit > 0):
            self._warn_clamp(f"rank {self.rank}", shape, cap)
        return min(self.rank, cap)

    def _warn_clamp(self, asked: str, shape: tuple[int, int], cap: int) -> None:
        m, n = shape
        if cap == 0:  # an empty matrix: nothing to save or warn about
            return
        limit = {"right": n, "left": m, "both": min(m, n)}[self.side(shape)]
        if cap == limit:
            why = f"is at or above the projected side ({limit}) of a {m}x{n} matrix"
            tail = ", so this matrix gets no memory saving"
        else:  # a factor basis of a larger projected side (rank 128 of a right 64x576)
            why = (f"is above min(m, n) = {cap} of a {m}x{n} matrix, the most singular "
                   f"vectors proj={self.name!r} can give")  # fmt: skip
            tail = ""
        warn_once(f"{asked} {why}: clamped to {cap}{tail}")

    def low_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the projected gradient (and of the low-rank moments)."""
        r = self.rank_for(shape)
        side = self.side(shape)
        return {"right": (shape[0], r), "left": (r, shape[1]), "both": (r, r)}[side]

    # -- the interface -------------------------------------------------------------
    @abstractmethod
    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        """Compute a new basis for the 2-D ``grad`` and store it in ``state``.

        ``seed`` is this parameter's seed for this refresh (same on every rank).
        """

    @abstractmethod
    def project(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        """Project the 2-D ``grad`` into the subspace."""

    @abstractmethod
    def project_back(self, state: dict[str, Any], low: Tensor) -> Tensor:
        """Map a projected tensor back to the full 2-D shape (no scaling)."""

    def apply_update(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float = 1.0
    ) -> None:
        """``out = beta * out + alpha * project_back(low)`` in place on the 2-D ``out``.

        Dense projectors override this with one fused ``addmm_`` so the full-size update
        is never materialized. Whatever the path, ``out`` is rounded once: for a bf16 / fp16
        ``out`` a decay (``beta``) applied as its own multiply would round back to ``out``.
        """
        upd = self.project_back(state, low)
        if beta != 1.0 and is_half(out):
            # the fresh full-size update is the fp32 work buffer: beta out + alpha upd
            work = upd.float() if upd.dtype != torch.float32 else upd
            work.mul_(alpha).add_(out, alpha=beta)
            out.copy_(work)
            return
        if beta != 1.0:
            out.mul_(beta)
        out.add_(upd.to(out.dtype), alpha=alpha)

    def change_of_basis(self, old: dict[str, Any], new: dict[str, Any]) -> list[Tensor]:
        """Matrices C with low_new = C-applied(low_old), for the ``rotate`` moments policy."""
        raise NotImplementedError(
            f"projector {self.name!r} cannot rotate moments into a new basis; use "
            "moments='keep' or moments='reset', or an orthonormal projector (svd, rsvd, "
            "subspace, orthogonal)"
        )

    def state_keys(self) -> tuple[str, ...]:
        """Per-parameter state keys this projector owns (for accounting)."""
        return ()

    def check_state(self, state: dict[str, Any], shape: tuple[int, int]) -> str | None:
        """Why ``state`` (loaded from a checkpoint) cannot belong to an ``m x n`` matrix,
        or None when it can. Checks what the projector stored about the shape."""
        saved = seeded_shape(state)
        if saved is not None and saved != tuple(shape):
            return f"its projector was built for a {saved[0]}x{saved[1]} matrix"
        return None

    def rebuild(self, state: dict[str, Any], like: Tensor) -> None:  # noqa: B027
        """Regenerate ``cache_*`` entries after a load; projectors with stored bases need none."""

    def __repr__(self) -> str:
        size = f"rank={self.rank}" if self.rank is not None else f"density={self.density}"
        return f"{type(self).__name__}({size}, proj_type={self.proj_type!r})"


def seeded_shape(state: dict[str, Any]) -> tuple[int, int] | None:
    """(rows, cols) of the matrix a seeded projector drew for: two ints ``proj_rows`` and
    ``proj_cols`` (plain numbers: torch DCP's flattened optimizer state takes no lists),
    or the ``[rows, cols]`` list ``proj_shape`` of checkpoints written before; None when
    the state holds neither."""
    if "proj_rows" in state:
        return int(state["proj_rows"]), int(state["proj_cols"])
    saved = state.get("proj_shape")
    if saved is None:
        return None
    rows, cols = (int(x) for x in saved)
    return rows, cols


def checked_float(grad: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``grad`` in the compute dtype (fp32 for half types, as galore-torch does for SVD)."""
    if dtype is not None:
        return grad.to(dtype)
    return grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
