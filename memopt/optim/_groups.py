"""Validation of param-group options, shared by every memopt optimizer.

Unknown keys are an error that lists the supported ones: a typo such as ``rnak=128``
would otherwise train a full-state optimizer without a word.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from memopt._utils.checks import finite_number
from memopt.optim.projection import PROJ_TYPES, PROJECTORS, DenseProjector, lowp

#: Keys torch.optim itself puts in groups, or that memopt's helpers add; torch's LR schedulers
#: write some into every group (OneCycleLR: max_lr, min_lr, base/max_momentum; CyclicLR:
#: base/max_momentum; swa_utils.SWALR: swa_lr), and a state dict saved under them must load.
BOOKKEEPING_KEYS = frozenset({
    "params", "param_names", "name", "initial_lr",
    "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr",
})  # fmt: skip
MOMENT_POLICIES = ("keep", "reset", "rotate")
STATE_DTYPES = (None, "float32", "int8", "int4")
MATMUL_DTYPES = (None, *lowp.MATMUL_DTYPES)


#: Keys torch.optim's Adam/AdamW put in groups, and the values under which memopt's update
#: is theirs (foreach/fused only pick torch's implementation: memopt always runs torch's
#: fused kernel where it exists). A memopt optimizer accepts them in a group (a torch
#: checkpoint loads with them, and a group copied from a loaded one must add) and ignores
#: them; a value that asks for more is refused by ``check_torch_keys``.
TORCH_GROUP_KEYS: dict[str, tuple[Any, ...]] = {
    "foreach": (None, False, True),
    "fused": (None, False, True),
    "capturable": (False,),
    "differentiable": (False,),
    "amsgrad": (False,),
    "maximize": (False,),
    "decoupled_weight_decay": (True, False),  # (False with weight decay: refused)
}
_TORCH_FIX = {
    "capturable": "memopt steps outside CUDA graphs; leave it False",
    "differentiable": "memopt's steps are not differentiable; leave it False",
    "amsgrad": "memopt implements Adam without AMSGrad; use torch.optim.AdamW for it",
    "maximize": "minimize the negated objective instead",
}


def check_known_keys(
    group: Mapping[str, Any], allowed: set[str], owner: str, *, torch_keys: bool = False
) -> None:
    """Refuse keys outside ``allowed`` (and bookkeeping keys; with ``torch_keys`` also
    torch.optim.AdamW's own, whose values ``check_torch_keys`` checks)."""
    known = allowed | BOOKKEEPING_KEYS | (set(TORCH_GROUP_KEYS) if torch_keys else set())
    unknown = sorted(set(group) - known, key=str)
    if unknown:
        raise ValueError(
            f"{owner}: unknown param-group option(s) {unknown}{did_you_mean(unknown, allowed)}"
            f"; supported: {sorted(allowed)}"
        )


def check_torch_keys(group: Mapping[str, Any], owner: str, tail: str = "") -> None:
    """torch.optim.AdamW's own options in ``group`` ask for nothing memopt does not do:
    ``foreach``/``fused`` of any value, the others at torch's defaults (``tail`` ends the
    message, e.g. "; nothing was loaded")."""
    for key, fine in TORCH_GROUP_KEYS.items():
        if key in group and not any(group[key] is v or group[key] == v for v in fine):
            raise ValueError(
                f"{owner}: {key}={group[key]!r} asks for a feature of torch.optim.AdamW that "
                f"memopt's optimizers do not implement ({_TORCH_FIX.get(key, 'see above')}); "
                f"memopt accepts it only as {' or '.join(repr(v) for v in fine)}{tail}"
            )
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
        raise ValueError(
            f"{owner}: decoupled_weight_decay=False with weight_decay="
            f"{group['weight_decay']!r} is torch.optim.Adam's L2 penalty; memopt's optimizers "
            "decay decoupled (AdamW). Use decoupled_weight_decay=True (AdamW's decay), or "
            f"weight_decay=0{tail}"
        )


def did_you_mean(unknown: list[Any], allowed: set[str]) -> str:
    """`` (did you mean 'rank' for 'rnak'?)`` for the unknown keys close to an allowed one."""
    pairs = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        if close:
            pairs.append(f"{close[0]!r} for {key!r}")
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


#: Number-valued group keys: (lowest value, whether the lowest itself is allowed). Each must
#: be a finite real number (``nan`` slips through ``x < 0``; torch refuses it too).
REAL_KEYS: dict[str, tuple[float, bool]] = {
    "lr": (0.0, True),
    "eps": (0.0, True),
    "weight_decay": (0.0, True),
    "scale": (0.0, False),
    "inactive_lr_scale": (0.0, True),
    "proj_params_lr_scale": (0.0, True),
    "nl_gamma": (1.0, True),
    "damping": (0.0, False),
}
#: On/off group keys: a bool (the string "false" would be truthy and switch the feature on).
BOOL_KEYS = ("correct_bias", "stagger", "state_free", "scale_front", "disable_nl")


def check_real(group: dict[str, Any], key: str, owner: str) -> None:
    """``group[key]`` is a finite real number within ``REAL_KEYS[key]``; a numpy scalar is
    stored back as a Python float (state_dict() must load with weights_only=True)."""
    value = group[key]
    number = finite_number(value, key, owner, *REAL_KEYS[key])
    if not isinstance(value, (int, float)):
        group[key] = number


def check_int(group: dict[str, Any], key: str, owner: str, hint: str = "") -> None:
    """``group[key]`` is an integer >= 1 (numpy integers are stored back as int)."""
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{owner}: {key} must be a positive integer, got {value!r}{hint}")
    group[key] = int(value)


def check_common(group: dict[str, Any], owner: str) -> None:
    """Checks shared by all memopt optimizers: every known number, integer and on/off key
    present in the group (learning rate, betas, eps, decay, scales, ...), and state_dtype."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        raise TypeError(
            f"{owner}: lr is a tensor ({lr!r}); memopt's optimizers take a Python float "
            "(tensor learning rates are torch's capturable / compiled-step feature; pass "
            "float(lr))"
        )
    for key in REAL_KEYS:
        if key in group:
            check_real(group, key, owner)
    for key in BOOL_KEYS:
        if key in group and not isinstance(group[key], bool):
            raise TypeError(f"{owner}: {key} must be True or False, got {group[key]!r}")
    betas = group.get("betas")
    if betas is not None:
        if (
            len(betas) != 2
            or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in betas)
            or not all(0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}")
    if group.get("state_dtype") not in STATE_DTYPES:
        raise ValueError(
            f"{owner}: state_dtype must be None (the parameter's dtype), 'float32', 'int8' or "
            "'int4', got "
            f"{group.get('state_dtype')!r}"
        )


def check_low_rank(
    group: dict[str, Any], owner: str, proj_key: str, extra: tuple[str, ...] = ()
) -> None:
    """Checks for a group that projects its gradients (it has ``rank`` or ``density``)."""
    density = group.get("density")
    if density is not None and (
        isinstance(density, bool) or not isinstance(density, numbers.Real)
        or not 0.0 <= float(density) <= 1.0
    ):
        raise ValueError(f"{owner}: density must be a number in [0, 1], got {density!r}")
    if density == 0 and group.get(proj_key) != "block":
        raise ValueError(
            f"{owner}: density 0 keeps no state-full subspace, which {proj_key}="
            f"{group.get(proj_key)!r} cannot project onto; for the state-free rule alone use "
            f"{proj_key}='block' (density 0) or a state_free=True group"
        )
    if group.get("rank") is not None:
        check_int(group, "rank", owner,
                  "; use a plain group (no 'rank' key) for full-state parameters")  # fmt: skip
    check_int(group, "update_proj_gap", owner)
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
    if not isinstance(group.get("proj_options", {}), Mapping):
        raise ValueError(f"{owner}: proj_options must be a mapping (a dict), got "
                         f"{group['proj_options']!r}")  # fmt: skip
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
    if "natural_history" in group:
        check_int(group, "natural_history", owner)


def _has_gemms(proj_name: str) -> bool:
    try:
        return issubclass(PROJECTORS.get(proj_name), DenseProjector)
    except ValueError:  # an optimizer's own mode (FRUGAL's "block"): no projection GEMMs
        return False
