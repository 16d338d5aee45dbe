"""Validation of param-group options, shared by every memopt optimizer.

Unknown keys are an error that lists the supported ones: a typo such as ``rnak=128``
would otherwise train a full-state optimizer without a word.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from memopt.optim.projection import PROJ_TYPES, PROJECTORS, DenseProjector, lowp

#: Keys torch.optim itself puts in groups, or that memopt's helpers add.
BOOKKEEPING_KEYS = frozenset({"params", "param_names", "name", "initial_lr"})
MOMENT_POLICIES = ("keep", "reset", "rotate")
STATE_DTYPES = (None, "float32", "int8", "int4")
MATMUL_DTYPES = (None, *lowp.MATMUL_DTYPES)


def check_known_keys(group: Mapping[str, Any], allowed: set[str], owner: str) -> None:
    unknown = sorted(set(group) - allowed - BOOKKEEPING_KEYS)
    if unknown:
        raise ValueError(
            f"{owner}: unknown param-group option(s) {unknown}; supported: {sorted(allowed)}"
        )


def check_common(group: Mapping[str, Any], owner: str) -> None:
    """Checks shared by all memopt optimizers (learning rate, betas, eps, decay)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        raise TypeError(
            f"{owner}: lr is a tensor ({lr!r}); memopt's optimizers take a Python float "
            "(tensor learning rates are torch's capturable / compiled-step feature; pass "
            "float(lr))"
        )
    if not isinstance(lr, (int, float)) or lr < 0 or not math.isfinite(lr):
        raise ValueError(f"{owner}: lr must be a finite number >= 0, got {lr!r}")
    betas = group.get("betas")
    if betas is not None:
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}")
    eps = group.get("eps", 0.0)
    if eps < 0:
        raise ValueError(f"{owner}: eps must be >= 0, got {eps!r}")
    wd = group.get("weight_decay", 0.0)
    if wd < 0:
        raise ValueError(f"{owner}: weight_decay must be >= 0, got {wd!r}")
    if group.get("state_dtype") not in STATE_DTYPES:
        raise ValueError(
            f"{owner}: state_dtype must be None (the parameter's dtype), 'float32', 'int8' or "
            "'int4', got "
            f"{group.get('state_dtype')!r}"
        )


def check_low_rank(
    group: Mapping[str, Any], owner: str, proj_key: str, extra: tuple[str, ...] = ()
) -> None:
    """Checks for a group that projects its gradients (it has ``rank`` or ``density``)."""
    density = group.get("density")
    if density is not None and not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0):
        raise ValueError(f"{owner}: density must be a number in [0, 1], got {density!r}")
    rank = group.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(
            f"{owner}: rank must be a positive integer, got {rank!r}; use a plain group "
            "(no 'rank' key) for full-state parameters"
        )
    gap = group.get("update_proj_gap")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"{owner}: update_proj_gap must be a positive integer, got {gap!r}")
    if group.get("proj_type") not in PROJ_TYPES:
        raise ValueError(
            f"{owner}: unknown proj_type {group.get('proj_type')!r}; choose one of: "
            f"{', '.join(PROJ_TYPES)}"
        )
    if group[proj_key] not in extra:
        try:
            PROJECTORS.get(group[proj_key])
        except ValueError:
            known = ", ".join([*PROJECTORS.names(), *extra])
            raise ValueError(
                f"{owner}: unknown {proj_key} {group[proj_key]!r}; choose one of: {known}"
            ) from None
    if group.get("moments", "keep") not in MOMENT_POLICIES:
        raise ValueError(
            f"{owner}: moments must be one of {MOMENT_POLICIES}, got {group.get('moments')!r}"
        )
    if group.get("matmul_dtype") not in MATMUL_DTYPES:
        raise ValueError(
            f"{owner}: matmul_dtype must be None (the gradient's dtype) or 'bfloat16', got "
            f"{group.get('matmul_dtype')!r}"
        )
    if group.get("matmul_dtype") is not None and not _has_gemms(group[proj_key]):
        raise ValueError(
            f"{owner}: matmul_dtype={group['matmul_dtype']!r} sets the dtype of projection GEMMs, "
            f"and {proj_key}={group[proj_key]!r} has none; use a dense projector (svd, rsvd, "
            "subspace, gram, random, orthogonal) or drop matmul_dtype"
        )
    scale = group.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"{owner}: scale must be a number > 0, got {scale!r}")


def _has_gemms(proj_name: str) -> bool:
    try:
        return issubclass(PROJECTORS.get(proj_name), DenseProjector)
    except ValueError:  # an optimizer's own mode (FRUGAL's "block"): no projection GEMMs
        return False
