"""The private FSDP2 internals that stage-3 NVMe offload (``ParamSwapper``) and the unit-by-unit
step rely on, reached in one place and checked before use.

``fully_shard`` exposes no public way to free a unit's sharded storage between uses, nor a
hook before its all-gather, so memopt uses these (as in torch 2.6 through 2.13):

- ``FSDPModule._get_fsdp_state()._fsdp_param_groups``: the units (``FSDPParamGroup``);
- per unit, the methods ``unshard(async_op)``, ``wait_for_unshard()`` and ``lazy_init()``
  (wrapped per instance) and the attributes ``_all_gather_result``, ``is_unsharded`` and
  ``fsdp_params``;
- per parameter (``FSDPParam``), ``sharded_param`` (a ``DTensor`` with ``_local_tensor``) and
  ``_sharded_param_data`` (the padded flat shard).

``check_fsdp2_internals`` raises ``NotImplementedError`` naming what is missing and the
installed torch version, instead of failing later inside a hook with an ``AttributeError``
from FSDP2's own code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["check_fsdp2_internals", "fsdp_groups", "unit_index"]

_GROUP_METHODS = ("unshard", "wait_for_unshard", "lazy_init")
_GROUP_ATTRS = ("_all_gather_result", "is_unsharded", "fsdp_params")
_PARAM_ATTRS = ("sharded_param", "_sharded_param_data")


def fsdp_groups(model: nn.Module) -> list[Any]:
    """Every ``FSDPParamGroup`` under ``model``, in ``model.modules()`` order (the same order
    on every rank)."""
    from torch.distributed.fsdp import FSDPModule

    groups: list[Any] = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            if id(group) not in seen:
                seen.add(id(group))
                groups.append(group)
    return groups


def unit_index(model: nn.Module) -> dict[int, int]:
    """``id(sharded parameter) -> index of its unit in fsdp_groups(model)``."""
    return {
        id(fp.sharded_param): i for i, g in enumerate(fsdp_groups(model)) for fp in g.fsdp_params
    }


def _missing(groups: list[Any]) -> list[str]:
    out: list[str] = []
    for g in groups:
        kind = type(g).__name__
        out += [f"{kind}.{m}()" for m in _GROUP_METHODS if not callable(getattr(g, m, None))]
        out += [f"{kind}.{a}" for a in _GROUP_ATTRS if not hasattr(g, a)]
        for fp in getattr(g, "fsdp_params", None) or []:
            out += [f"{type(fp).__name__}.{a}" for a in _PARAM_ATTRS if not hasattr(fp, a)]
            local = getattr(getattr(fp, "sharded_param", None), "_local_tensor", None)
            if hasattr(fp, "sharded_param") and local is None:
                out.append(f"{type(fp).__name__}.sharded_param._local_tensor")
    return sorted(set(out))


def check_fsdp2_internals(groups: list[Any], what: str) -> None:
    """Raise ``NotImplementedError`` when ``groups`` is empty or lacks an internal listed in
    the module docstring; ``what`` names the feature in the message."""
    if not groups:
        raise NotImplementedError(
            f"{what}: found no FSDP2 units (torch {torch.__version__} may keep them elsewhere, "
            "or the model was not wrapped with fully_shard); use stage 3 without it"
        )
    missing = _missing(groups)
    if missing:
        raise NotImplementedError(
            f"{what} relies on FSDP2 internals that torch {torch.__version__} does not have: "
            f"{', '.join(missing)}. It is tested with torch 2.13; install that version or use "
            "stage 3 without it"
        )
