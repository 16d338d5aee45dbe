"""What the optimizer-state rules accept: the ``optimizer_kwargs`` of each optimizer, their
allowed values, and the combinations the optimizers refuse.

``check_kwargs`` validates as the optimizers' ``add_param_group`` / ``check_group`` do
(``memopt.optim._groups``, ``apollo``, ``frugal``, ``projection``): an unknown key (a typo
such as ``rnak``), a value, or a combination the optimizer would refuse is a ``ValueError``
naming it and what is allowed, so nothing the optimizer cannot run is ever priced. Layer 2
may not import ``memopt.optim``: the lists are restated here, and
``tests/memory/test_estimate_inputs.py`` pins them to the optimizers' own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: What the optimizers accept (memopt.optim._groups.STATE_DTYPES, projection.PROJ_TYPES and
#: PROJECTORS' names).
STATE_DTYPES = (None, "float32", "int8", "int4")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJ_NAMES = ("columns", "coordinate", "gram", "orthogonal", "random", "randperm", "rsvd",
              "subspace", "svd")  # fmt: skip
#: Projector kinds by what they keep: a basis computed from the gradient (saved state), a
#: basis regenerated from a seed (cache), or int64 index vectors (cache).
DENSE_PROJ = ("svd", "gram", "rsvd", "subspace")
SEEDED_PROJ = ("random", "orthogonal")
INDEX_PROJ = ("columns", "randperm", "coordinate")
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
#: Each optimizer's size and projector when ``optimizer_kwargs`` give none (the optimizers
#: themselves need a rank or density from ``param_groups``; these are the estimator's).
DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "galore": {"rank": 128, "proj": "svd"},
    "natural_galore": {"rank": 128, "proj": "svd"},
    "apollo": {"rank": 256, "proj": "random"},
    "apollo_mini": {"rank": 1, "proj": "random"},
    "frugal": {"density": 0.25, "proj": "svd"},
}


def resolve(optimizer: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` over the optimizer's defaults; a given rank or density replaces the
    default size (of either kind)."""
    given = dict(kwargs or {})
    out = dict(DEFAULTS[optimizer])
    if "rank" in given or "density" in given:
        out.pop("rank", None)
        out.pop("density", None)
    out.update(given)
    return out


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
    bad = _bad_value(optimizer, kwargs) or _refused(optimizer, kwargs)
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
    if optimizer == "apollo_mini" and kw.get("rank", 1) != 1:
        return (f"apollo_mini is rank 1, got rank={kw['rank']!r} (ApolloMini refuses another "
                "rank); tensor-wise APOLLO at another rank is ApolloAdamW(scale_type='tensor')")
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


def _refused(optimizer: str, kw: Mapping[str, Any]) -> str | None:
    """Combinations of valid values that the optimizer refuses at construction."""
    proj, ptype = kw.get("proj", DEFAULTS[optimizer].get("proj")), kw.get("proj_type", "std")
    if proj == "gram" and ptype == "full":
        return "proj='gram' is one-sided; use 'svd' for proj_type='full' (the optimizers refuse it)"
    if optimizer in ("apollo", "apollo_mini"):
        if ptype == "full":
            return ("APOLLO scales the channels of one side: proj_type='full' (two-sided) is "
                    "refused; use std, reverse_std, left or right")  # fmt: skip
        if proj in INDEX_PROJ:
            return (f"proj={proj!r} selects entries instead of projecting onto a basis, and "
                    f"APOLLO's channel scaling needs one (it refuses it); use one of "
                    f"{(*DENSE_PROJ, *SEEDED_PROJ)}")  # fmt: skip
    if optimizer == "frugal":
        if proj == "random":
            return ("FRUGAL needs an orthonormal projector and 'random' is not (FrugalAdamW "
                    "refuses it); use 'orthogonal' (FRUGAL's 'random'), 'svd', 'columns' or "
                    "'coordinate'")  # fmt: skip
        if proj in ("block", "coordinate") and "rank" in kw:
            return f"proj={proj!r} needs density=..., not rank (FrugalAdamW refuses rank)"
    return None
