"""Optimizer-state byte rules, one per memopt optimizer, keyed by name.

Layer 2 cannot import ``memopt.optim``, so the rules restate what each optimizer allocates
(``tests/memory/test_optstate.py`` checks them against ``memopt.optim.state_bytes`` of the
real optimizers after a step). Per parameter, an m x n matrix (higher-rank tensors are viewed
as dim 0 x the rest), moments in ``state_dtype`` (None: the parameter's dtype):

- full AdamW: two moments of m n elements;
- low-rank (GaLore, APOLLO, FRUGAL): the side selection of ``proj_type`` ("std": right
  projection when m >= n), rank clamped to the reduced side, moments of the projected shape
  (m x r or r x n); a dense basis (svd: r x n or m x r) is saved state, a seeded random one
  (APOLLO) is a regenerable *cache* (still memory), either in the weights' dtype, or fp32
  under any ``state_dtype``; APOLLO adds a 4-byte limiter scalar;
  Natural GaLore adds ``natural_history`` = s x (projected numel) of gradient history and
  its s x s Gram matrix;
- FRUGAL ``density``: rank = round(density x reduced side); ``proj="block"`` gives full moments
  to round(density x count) whole tensors of the group and nothing to the rest;
- 8-/4-bit moments (``state_dtype="int8"/"int4"``), for moment tensors of >= 4096 elements:
  one byte (half a byte) per element plus an fp32 absmax per 256 (128) elements; smaller
  tensors stay fp32.

``check_kwargs`` validates the options the rules read (``KWARGS``), as the optimizers'
``add_param_group`` does (``memopt.optim._groups``): an unknown key (a typo such as
``rnak``) or value is a ``ValueError`` listing the supported ones, never ignored. The value
lists restate the optimizers' (``tests/memory/test_estimate_inputs.py`` pins them equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memopt.memory.model import ParamInfo

MIN_LOWBIT_NUMEL = 4096
LOWBIT_BLOCK = {"int8": 256, "int4": 128}
DENSE_PROJ = ("svd", "gram", "rsvd", "randomized_svd")
#: What the optimizers accept (memopt.optim._groups.STATE_DTYPES, projection.PROJ_TYPES and
#: PROJECTORS' names): restated here because layer 2 may not import memopt.optim.
STATE_DTYPES = (None, "float32", "int8", "int4")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJ_NAMES = ("columns", "coordinate", "gram", "orthogonal", "random", "randperm", "rsvd",
              "subspace", "svd")  # fmt: skip
_LOW_RANK_KEYS = ("state_dtype", "rank", "density", "proj", "proj_type")
#: The ``optimizer_kwargs`` each rule reads (the options that change memory).
KWARGS: dict[str, tuple[str, ...]] = {
    "adamw": ("state_dtype",),
    "galore": _LOW_RANK_KEYS,
    "natural_galore": (*_LOW_RANK_KEYS, "natural_history"),
    "apollo": _LOW_RANK_KEYS,
    "apollo_mini": _LOW_RANK_KEYS,
    "frugal": _LOW_RANK_KEYS,
}


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


def low_shape(shape: tuple[int, int], kw: Mapping[str, Any]) -> tuple[int, int, str]:
    """(rows, cols) of the projected gradient and the side ("right"/"left"/"both")."""
    m, n = shape
    ptype = kw.get("proj_type", "std")
    side = {
        "std": "right" if m >= n else "left",
        "reverse_std": "left" if m >= n else "right",
        "left": "left",
        "right": "right",
        "full": "both",
    }[ptype]
    limit = {"right": n, "left": m, "both": min(m, n)}[side]
    if kw.get("density") is not None:
        r = max(1, min(limit, round(float(kw["density"]) * limit)))
    else:
        r = min(int(kw["rank"]), limit)
    return {"right": (m, r), "left": (r, n), "both": (r, r)}[side] + (side,)


def _basis_numel(shape: tuple[int, int], low: tuple[int, int, str]) -> int:
    m, n = shape
    r_rows, r_cols, side = low
    if side == "right":
        return r_cols * n
    if side == "left":
        return m * r_rows
    return m * r_rows + r_cols * n


Rule = Callable[[ParamInfo, Mapping[str, Any]], tuple[int, int]]


def _full(p: ParamInfo, kw: Mapping[str, Any]) -> tuple[int, int]:
    return moment_bytes(p.numel, p.dtype, kw.get("state_dtype")), 0


def _projected(p: ParamInfo, kw: Mapping[str, Any], default_proj: str) -> tuple[int, int, int]:
    """(moments, basis, projected numel) of a low-rank parameter."""
    shape = matrix(p.shape)
    low = low_shape(shape, kw)
    low_numel = low[0] * low[1]
    moments = moment_bytes(low_numel, p.dtype, kw.get("state_dtype"))
    # any state_dtype computes in fp32, and the basis is then kept in fp32 too
    # (MemoptOptimizer.projector: basis_dtype); otherwise the gradient's dtype
    basis_size = 4 if kw.get("state_dtype") is not None else p.dtype.itemsize
    basis = _basis_numel(shape, low) * basis_size
    return moments, basis, low_numel


def _galore(p: ParamInfo, kw: Mapping[str, Any]) -> tuple[int, int]:
    if not p.low_rank or len(p.shape) < 2:
        return _full(p, kw)
    moments, basis, _ = _projected(p, kw, "svd")
    dense = kw.get("proj", "svd") in DENSE_PROJ
    return (moments + basis, 0) if dense else (moments, basis)


def _natural_galore(p: ParamInfo, kw: Mapping[str, Any]) -> tuple[int, int]:
    if not p.low_rank or len(p.shape) < 2:
        return _full(p, kw)
    saved, cache = _galore(p, kw)
    _, _, low_numel = _projected(p, kw, "svd")
    s = int(kw.get("natural_history", 4))
    # the history and its Gram matrix, kept in at least fp32 (_functional.woodbury_dtype)
    history = (s * low_numel + s * s) * max(4, p.dtype.itemsize)
    return saved + history, cache


def _apollo(p: ParamInfo, kw: Mapping[str, Any]) -> tuple[int, int]:
    if not p.low_rank or len(p.shape) < 2:
        return _full(p, kw)
    moments, basis, _ = _projected(p, kw, "random")
    return moments + 4, basis  # + the norm-growth limiter's fp32 scalar; basis is a cache


def _frugal(p: ParamInfo, kw: Mapping[str, Any]) -> tuple[int, int]:
    if not p.low_rank or len(p.shape) < 2:
        return _full(p, kw)
    return _galore(p, kw)


RULES: dict[str, tuple[Rule, dict[str, Any]]] = {
    "adamw": (_full, {}),
    "galore": (_galore, {"rank": 128}),
    "natural_galore": (_natural_galore, {"rank": 128}),
    "apollo": (_apollo, {"rank": 256}),
    "apollo_mini": (_apollo, {"rank": 1}),
    "frugal": (_frugal, {"density": 0.25}),
}


def _frugal_block(params: Sequence[ParamInfo], kw: Mapping[str, Any]) -> StateEstimate:
    """FRUGAL block mode, first window ("descending": the last k low-rank tensors)."""
    low = [p for p in params if p.low_rank]
    k = round(len(low) * float(kw.get("density", 0.25)))
    active = {p.name for p in low[len(low) - k :]} if k else set()
    per = {}
    for p in params:
        per[p.name] = _full(p, kw)[0] if (not p.low_rank or p.name in active) else 0
    return StateEstimate(sum(per.values()), 0, per)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_kwargs(optimizer: str, kwargs: Mapping[str, Any]) -> None:
    """``ValueError`` naming the option and its allowed values for anything the rules of
    ``optimizer`` would not read as the optimizer does (see the module docstring)."""
    owner = f"optimizer_kwargs of {optimizer!r}"
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{owner} must be a mapping, got {type(kwargs).__name__}")
    allowed = KWARGS[optimizer]
    unknown = sorted(set(kwargs) - set(allowed), key=str)
    if unknown:
        hint = " (adamw keeps full state: no rank or density)" if optimizer == "adamw" else ""
        raise ValueError(
            f"{owner}: unknown option(s) {unknown}; supported: {sorted(allowed)}, the options "
            f"that change memory{hint}"
        )
    bad = _bad_value(optimizer, kwargs)
    if bad:
        raise ValueError(f"{owner}: {bad}")


def _bad_value(optimizer: str, kw: Mapping[str, Any]) -> str | None:
    if kw.get("state_dtype") not in STATE_DTYPES:
        return (
            "state_dtype must be None (the parameter's dtype), 'float32', 'int8' or 'int4', "
            f"got {kw['state_dtype']!r}"
        )
    if kw.get("rank") is not None and kw.get("density") is not None:
        return "give rank or density, not both (the optimizers refuse both)"
    if optimizer == "apollo_mini" and kw.get("density") is not None:
        return "apollo_mini is rank 1: density does not apply (ApolloMini refuses it)"
    if "rank" in kw and not _positive_int(kw["rank"]):
        return f"rank must be a positive integer, got {kw['rank']!r}"
    density = kw.get("density")
    if density is not None and not (
        isinstance(density, (int, float)) and not isinstance(density, bool) and 0 <= density <= 1
    ):
        return f"density must be a number in [0, 1], got {density!r}"
    if density == 0 and kw.get("proj", "svd") != "block":
        return ("density 0 keeps no state-full subspace: only proj='block' takes it (as "
                "FrugalAdamW refuses)")  # fmt: skip
    if kw.get("proj_type", "std") not in PROJ_TYPES:
        return f"proj_type must be one of {PROJ_TYPES}, got {kw['proj_type']!r}"
    names = (*PROJ_NAMES, "block") if optimizer == "frugal" else PROJ_NAMES
    if kw.get("proj", "svd") not in names:
        return f"proj must be one of {names}, got {kw['proj']!r}"
    if "natural_history" in kw and not _positive_int(kw["natural_history"]):
        return f"natural_history must be a positive integer, got {kw['natural_history']!r}"
    return None


def optimizer_state(
    params: Sequence[ParamInfo], optimizer: str, kwargs: Mapping[str, Any] | None = None
) -> StateEstimate:
    """Predicted state of ``optimizer`` (a key of ``RULES``) over ``params`` after a step."""
    if optimizer not in RULES:
        raise ValueError(
            f"memopt.memory: unknown optimizer {optimizer!r}; choose one of {sorted(RULES)}"
        )
    check_kwargs(optimizer, kwargs or {})
    rule, defaults = RULES[optimizer]
    kw = {**defaults, **(kwargs or {})}
    if "density" in (kwargs or {}) and optimizer != "frugal":
        kw.pop("rank", None)
    if optimizer == "frugal" and "rank" in (kwargs or {}) and "density" not in (kwargs or {}):
        kw.pop("density", None)
    if optimizer == "frugal" and kw.get("proj") == "block":
        return _frugal_block(params, kw)
    per, total, cache = {}, 0, 0
    for p in params:
        saved, c = rule(p, kw)
        per[p.name] = saved
        total += saved
        cache += c
    return StateEstimate(total, cache, per)
