"""Optimizer-state byte rules, one per memopt optimizer, keyed by name.

Layer 2 cannot import ``memopt.optim``, so the rules restate what each optimizer allocates
(``tests/memory/test_optstate.py`` checks them against ``memopt.optim.state_bytes`` of the
real optimizers after a step, for every projector each optimizer accepts). Per parameter, an
m x n matrix (higher-rank tensors are viewed as dim 0 x the rest), moments in ``state_dtype``
(None: the parameter's dtype):

- full AdamW: two moments of m n elements;
- low-rank (GaLore, APOLLO, FRUGAL): the side selection of ``proj_type`` ("std": right
  projection when m >= n), rank clamped to the reduced side (and to min(m, n) for an
  SVD-based basis, as ``Projector.rank_for``), moments of the projected shape
  (m x r, r x n, or r x r for "full"). What the projector keeps beside them
  (``optkwargs.DENSE_PROJ`` / ``SEEDED_PROJ`` / ``INDEX_PROJ``):

  - a basis computed from the gradient (``svd``, ``gram``, ``rsvd``, ``subspace``: r x n,
    m x r, or both) is saved state; a seeded one (``random``, ``orthogonal``) is a
    regenerable *cache* (still memory); either in the weights' dtype, or fp32 under any
    ``state_dtype``;
  - ``columns`` / ``randperm`` keep int64 index vectors as cache: the kept rows and columns
    (all m rows and r columns for a right projection, r rows and all n columns for a left
    one, r and r for "full");
  - ``coordinate`` keeps k entries of the whole matrix (k = round(density m n), or
    rank x min(m, n)): flat moments of k elements and an int64 index of k as cache;

  APOLLO adds a 4-byte limiter scalar; Natural GaLore adds ``natural_history`` = s x
  (projected numel) of gradient history and its s x s Gram matrix;
- FRUGAL ``density``: rank = round(density x reduced side); ``proj="block"`` gives full moments
  to round(density x count) whole tensors of the group and nothing to the rest;
- 8-/4-bit moments (``state_dtype="int8"/"int4"``), for moment tensors of >= 4096 elements:
  one byte (half a byte) per element plus an fp32 absmax per 256 (128) elements; smaller
  tensors stay fp32.

A row shard (``rows`` of a row-sharded parameter under ``dim0`` / stage 3, see ``sharding``)
keeps moments of its own rows; a right-sided projection's r x n basis is whole on every rank.

``check_kwargs`` (``optkwargs``) validates the options the rules read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memopt.memory.model import ParamInfo
from memopt.memory.optkwargs import (
    DEFAULTS,
    DENSE_PROJ,
    INDEX_PROJ,
    KWARGS,
    PROJ_NAMES,
    PROJ_TYPES,
    SEEDED_PROJ,
    STATE_DTYPES,
    check_kwargs,
    resolve,
)

__all__ = [
    "DENSE_PROJ", "INDEX_PROJ", "KWARGS", "PROJ_NAMES", "PROJ_TYPES", "RULES", "SEEDED_PROJ",
    "STATE_DTYPES", "Projection", "StateEstimate", "check_kwargs", "matrix", "moment_bytes",
    "optimizer_state", "projection", "resolve", "state_rule",
]  # fmt: skip

MIN_LOWBIT_NUMEL = 4096
LOWBIT_BLOCK = {"int8": 256, "int4": 128}
INDEX_BYTES = 8  # int64 indices
#: Projectors whose basis is cut from an SVD's factors (at most min(m, n) vectors).
SVD_PROJ = ("svd", "rsvd", "subspace")


@dataclass(frozen=True)
class StateEstimate:
    """Predicted optimizer state: saved bytes, regenerable cache bytes, per parameter."""

    total: int
    cache: int
    per_param: dict[str, int]

    @property
    def memory(self) -> int:
        """Everything the state keeps in memory (saved + cache)."""
        return self.total + self.cache


def moment_bytes(numel: int, dtype: torch.dtype, state_dtype: str | None) -> int:
    """Bytes of Adam's two moments of ``numel`` elements each."""
    if state_dtype in LOWBIT_BLOCK and numel >= MIN_LOWBIT_NUMEL:
        block = LOWBIT_BLOCK[state_dtype]
        codes = numel if state_dtype == "int8" else -(-numel // 2)
        return 2 * (codes + 4 * -(-numel // block))
    size = 4 if state_dtype is not None else dtype.itemsize
    return 2 * numel * size


def matrix(shape: Sequence[int]) -> tuple[int, int]:
    rows = int(shape[0]) if shape else 1
    return rows, (math.prod(shape) // rows if rows else 0)


@dataclass(frozen=True)
class Projection:
    """How a projector reduces an m x n matrix (as ``Projector.side`` / ``rank_for`` /
    ``low_shape``; ``coordinate``: ``rank`` is the entry count k and ``low`` is (k,))."""

    side: str  # "right", "left" or "both"
    rank: int
    low: tuple[int, ...]

    @property
    def low_numel(self) -> int:
        return math.prod(self.low)


def projection(shape: tuple[int, int], kw: Mapping[str, Any]) -> Projection:
    """The projection of an m x n matrix under the resolved options ``kw``, as
    ``Projector.rank_for`` / ``low_shape`` give it: an SVD-based basis (``svd``, ``rsvd``,
    ``subspace``) has at most min(m, n) vectors, so its rank is capped there whatever the
    side."""
    m, n = shape
    side = {
        "std": "right" if m >= n else "left",
        "reverse_std": "left" if m >= n else "right",
        "left": "left",
        "right": "right",
        "full": "both",
    }[kw.get("proj_type", "std")]
    if kw.get("proj") == "coordinate":
        total = m * n
        if kw.get("density") is not None:
            k = min(total, max(1, round(float(kw["density"]) * total)))
        else:
            k = min(total, int(kw["rank"]) * min(m, n))
        return Projection(side, k, (k,))
    limit = {"right": n, "left": m, "both": min(m, n)}[side]
    if kw.get("density") is not None:
        r = min(limit, max(1, round(float(kw["density"]) * limit)))
    else:
        r = min(int(kw["rank"]), limit)
    if kw.get("proj") in SVD_PROJ:  # an SVD has min(m, n) vectors, whatever r is
        r = min(r, m, n)
    return Projection(side, r, {"right": (m, r), "left": (r, n), "both": (r, r)}[side])


def _kept(shape: tuple[int, int], proj: Projection, name: str, size: int) -> tuple[int, int]:
    """(saved, cache) bytes the projector keeps beside the moments (see the docstring)."""
    m, n = shape
    r = proj.rank
    if name == "coordinate":
        return 0, INDEX_BYTES * r
    if name in INDEX_PROJ:  # columns / randperm: kept rows and columns
        rows = {"right": m, "left": r, "both": r}[proj.side]
        cols = {"right": r, "left": n, "both": r}[proj.side]
        return 0, INDEX_BYTES * (rows + cols)
    basis = {"right": r * n, "left": m * r, "both": m * r + r * n}[proj.side] * size
    return (basis, 0) if name in DENSE_PROJ else (0, basis)


#: (parameter, resolved kwargs, rows of a row shard or None) -> (saved, cache) bytes
Rule = Callable[[ParamInfo, Mapping[str, Any], int | None], tuple[int, int]]


def _full(p: ParamInfo, kw: Mapping[str, Any], rows: int | None = None) -> tuple[int, int]:
    m, n = matrix(p.shape)
    numel = p.numel if rows is None else rows * n
    return moment_bytes(numel, p.dtype, kw.get("state_dtype")), 0


def _projected(p: ParamInfo, kw: Mapping[str, Any], rows: int | None) -> tuple[int, int, int]:
    """(saved, cache, projected numel) of a low-rank parameter (a right-sided row shard of
    ``rows`` rows: moments of its rows, the whole basis)."""
    shape = matrix(p.shape)
    proj = projection(shape, kw)
    low = proj.low_numel if rows is None else rows * proj.rank
    moments = moment_bytes(low, p.dtype, kw.get("state_dtype"))
    # any state_dtype computes in fp32, and the basis is then kept in fp32 too
    # (MemoptOptimizer.projector: basis_dtype); otherwise the gradient's dtype
    size = 4 if kw.get("state_dtype") is not None else p.dtype.itemsize
    saved, cache = _kept(shape, proj, kw["proj"], size)
    return moments + saved, cache, low


def _galore(p: ParamInfo, kw: Mapping[str, Any], rows: int | None = None) -> tuple[int, int]:
    if not p.low_rank or len(p.shape) < 2:
        return _full(p, kw, rows)
    saved, cache, _ = _projected(p, kw, rows)
    return saved, cache


def _natural_galore(
    p: ParamInfo, kw: Mapping[str, Any], rows: int | None = None
) -> tuple[int, int]:
    if not p.low_rank or len(p.shape) < 2:
        return _full(p, kw, rows)
    saved, cache, low_numel = _projected(p, kw, rows)
    s = int(kw.get("natural_history", 4))
    # the history and its Gram matrix, kept in at least fp32 (_functional.woodbury_dtype)
    history = (s * low_numel + s * s) * max(4, p.dtype.itemsize)
    return saved + history, cache


def _apollo(p: ParamInfo, kw: Mapping[str, Any], rows: int | None = None) -> tuple[int, int]:
    if not p.low_rank or len(p.shape) < 2:
        return _full(p, kw, rows)
    saved, cache, _ = _projected(p, kw, rows)
    return saved + 4, cache  # + the norm-growth limiter's fp32 scalar


RULES: dict[str, tuple[Rule, dict[str, Any]]] = {
    "adamw": (_full, DEFAULTS["adamw"]),
    "galore": (_galore, DEFAULTS["galore"]),
    "natural_galore": (_natural_galore, DEFAULTS["natural_galore"]),
    "apollo": (_apollo, DEFAULTS["apollo"]),
    "apollo_mini": (_apollo, DEFAULTS["apollo_mini"]),
    "frugal": (_galore, DEFAULTS["frugal"]),
}


def _block_active(params: Sequence[ParamInfo], kw: Mapping[str, Any]) -> set[str]:
    """FRUGAL block mode, first window ("descending": the last k low-rank tensors)."""
    low = [p for p in params if p.low_rank]
    k = round(len(low) * float(kw.get("density", 0.25)))
    return {p.name for p in low[len(low) - k :]} if k else set()


def state_rule(
    params: Sequence[ParamInfo], optimizer: str, kwargs: Mapping[str, Any] | None = None
) -> Callable[[ParamInfo, int | None], tuple[int, int]]:
    """``rule(p, rows)``: (saved, cache) bytes of ``p`` (or of its row shard of ``rows``
    rows) under ``optimizer``; ``params`` are all of them (FRUGAL block picks among them)."""
    if optimizer not in RULES:
        raise ValueError(
            f"memopt.memory: unknown optimizer {optimizer!r}; choose one of {sorted(RULES)}"
        )
    check_kwargs(optimizer, kwargs or {})
    kw = resolve(optimizer, kwargs)
    rule = RULES[optimizer][0]
    if optimizer == "frugal" and kw.get("proj") == "block":
        active = _block_active(params, kw)

        def block(p: ParamInfo, rows: int | None) -> tuple[int, int]:
            keeps = not p.low_rank or p.name in active
            return _full(p, kw, rows) if keeps else (0, 0)

        return block
    return lambda p, rows: rule(p, kw, rows)


def optimizer_state(
    params: Sequence[ParamInfo], optimizer: str, kwargs: Mapping[str, Any] | None = None
) -> StateEstimate:
    """Predicted state of ``optimizer`` (a key of ``RULES``) over ``params`` after a step."""
    rule = state_rule(params, optimizer, kwargs)
    per, total, cache = {}, 0, 0
    for p in params:
        saved, c = rule(p, None)
        per[p.name] = saved
        total += saved
        cache += c
    return StateEstimate(total, cache, per)
