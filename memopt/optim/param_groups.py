"""``param_groups``: split a model's parameters into low-rank and full-state groups.

The policy, stated once:

- Targets are the ``weight`` of modules whose qualified name matches ``target`` (a
  regular expression searched in the name, a list of names/regexes, or ``"all-linear"``)
  and not ``exclude``, and whose weight has 2 or more dims. ``"all-linear"`` takes every
  ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's) except the output head (see below);
  HF's ``"all-linear"`` includes it.
- The output head (a Linear named ``lm_head``/``output``/``classifier``/``score``, or
  one whose weight is tied to an embedding), embeddings and norms never become low-rank
  targets, even when ``target`` matches them (as in the GaLore and APOLLO references); to
  project one anyway, build that group by hand (``{"params": [...], "rank": ...}``).
- Everything else goes to a full-state group. With ``weight_decay`` given, 2-D+
  non-targets decay and 1-D parameters (biases, norm scales) do not.
- ``state_free`` (FRUGAL): a tuple from ("embeddings", "norms", "head", "biases") whose
  parameters go to a group with ``state_free=True`` (signSGD, no optimizer state).
- A tied parameter appears once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from memopt._utils.modules import head_modules, is_linear, is_norm
from memopt.optim._groups import check_known_keys
from memopt.optim.adamw import AdamW
from memopt.optim.apollo import ApolloAdamW, ApolloMini
from memopt.optim.frugal import FrugalAdamW
from memopt.optim.galore import GaLoreAdamW
from memopt.optim.natural_galore import NaturalGaLoreAdamW

STATE_FREE_KINDS = ("embeddings", "norms", "head", "biases")
OPTIMIZERS = (AdamW, GaLoreAdamW, NaturalGaLoreAdamW, ApolloAdamW, ApolloMini, FrugalAdamW)


def group_options() -> set[str]:
    """The options ``param_groups`` lets into a group: every one some memopt optimizer takes
    (``param_groups`` does not know which optimizer will take the groups; each refuses the
    others' options itself). The keys LR schedulers add (``initial_lr`` ...) pass too."""
    keys: set[str] = set()
    for cls in OPTIMIZERS:
        keys |= cls.group_keys()
    return keys


def _matcher(target: str | Sequence[str]) -> re.Pattern[str] | None:
    if target == "all-linear":
        return None
    pats = [target] if isinstance(target, str) else list(target)
    if not pats:
        raise ValueError("target is empty: give a regex, a list of names, or 'all-linear'")
    try:
        return re.compile("|".join(f"(?:{p})" for p in pats))
    except re.error as e:
        raise ValueError(f"target {target!r} is not a valid regular expression: {e}") from None


def param_groups(
    model: nn.Module,
    target: str | Sequence[str] = "attn|mlp",
    *,
    exclude: str | Sequence[str] | None = None,
    weight_decay: float | None = None,
    state_free: Sequence[str] = (),
    **low_rank_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for a memopt optimizer.

    ``low_rank_options`` (``rank=128``, ``update_proj_gap=200``, ``scale=0.25``,
    ``density=0.25``, ``proj="svd"`` ...) go into the low-rank group. Groups carry
    ``param_names`` so errors and state can name parameters.

    Returns groups in the order: low-rank, full-state decayed, full-state not decayed,
    state-free (empty groups are left out). Raises ``ValueError`` if nothing matches, or for
    an option no memopt optimizer takes (naming the closest one: ``rnak`` -> ``rank``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"param_groups needs the model (an nn.Module: it selects by module name and type), "
            f"got {type(model).__name__}; pass model, not model.parameters()"
        )
    if isinstance(state_free, str):
        raise TypeError(f"state_free is a tuple of kinds, e.g. ({state_free!r},), got the "
                        f"string {state_free!r}")  # fmt: skip
    if target is None or (not isinstance(target, str) and not isinstance(target, Sequence)):
        raise TypeError(f"target must be a regex, a list of names/regexes, or 'all-linear', "
                        f"got {target!r}")  # fmt: skip
    if exclude is not None and (exclude == "" or (not isinstance(exclude, str) and not exclude)):
        raise ValueError("exclude is empty (an empty regex excludes every module); pass None "
                         "to exclude nothing")  # fmt: skip
    bad = sorted(set(state_free) - set(STATE_FREE_KINDS))
    if bad:
        raise ValueError(f"state_free kinds {bad} unknown; choose from {STATE_FREE_KINDS}")
    _check_options(low_rank_options)
    if "rank" not in low_rank_options and "density" not in low_rank_options:
        raise ValueError("param_groups needs rank=... (GaLore/APOLLO) or density=... (FRUGAL)")
    pattern = _matcher(target)
    excl = _matcher(exclude) if exclude is not None else None
    heads = head_modules(model)
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {
        "low": [],
        "decay": [],
        "no_decay": [],
        "free": [],
    }
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            kind = _kind(mod, mod_name, p_name, p, heads)
            if kind == "target-candidate" and _selected(mod, mod_name, pattern, excl, heads):
                buckets["low"].append((full, p))
            elif kind in state_free:
                buckets["free"].append((full, p))
            elif p.dim() >= 2 and weight_decay is not None:
                buckets["decay"].append((full, p))
            else:
                buckets["no_decay" if weight_decay is not None else "decay"].append((full, p))
    if not buckets["low"]:
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("param_groups: every parameter of the model is frozen "
                             "(requires_grad=False); there is nothing to train")  # fmt: skip
        names = [n for n, m in model.named_modules()
                 if is_linear(m) and n not in heads][:8]  # fmt: skip
        raise ValueError(
            f"target {target!r} matched no weight; Linear modules that can be targets include "
            f"{names} (embeddings, norms and the output head never are). Pass a regex over "
            "module names, a list, or 'all-linear'"
        )
    return _assemble(buckets, weight_decay, low_rank_options)


def _check_options(options: dict[str, Any]) -> None:
    """Refuse a key no optimizer takes (a typo such as ``rnak=2`` or ``scael=0.5``) here,
    naming it, before it is mistaken for a missing rank or put into the group."""
    own = sorted({"params", "param_names"} & set(options))
    if own:
        raise ValueError(f"param_groups: {own} are filled in by param_groups itself (the "
                         "selected parameters and their names); select them with target= "
                         "and exclude=, or build that group by hand")  # fmt: skip
    check_known_keys(options, group_options(), "param_groups")


def _kind(mod: nn.Module, mod_name: str, p_name: str, p: nn.Parameter, heads: set[str]) -> str:
    if isinstance(mod, nn.Embedding):
        return "embeddings"
    if is_norm(mod):
        return "norms"
    if mod_name in heads:
        return "head" if p_name == "weight" else "biases"
    if p.dim() < 2:
        return "biases"
    return "target-candidate" if p_name == "weight" else "other"


def _selected(
    mod: nn.Module,
    name: str,
    pattern: re.Pattern[str] | None,
    excl: re.Pattern[str] | None,
    heads: set[str],
) -> bool:
    if excl is not None and excl.search(name):
        return False
    if pattern is None:
        return is_linear(mod) and name not in heads
    return bool(pattern.search(name))


def _assemble(
    buckets: dict[str, list[tuple[str, nn.Parameter]]],
    weight_decay: float | None,
    options: dict[str, Any],
) -> list[dict[str, Any]]:
    def group(items: list[tuple[str, nn.Parameter]], **extra: Any) -> dict[str, Any]:
        return {"params": [p for _, p in items], "param_names": [n for n, _ in items], **extra}

    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    out = [group(buckets["low"], **options, **wd)]
    if buckets["decay"]:
        out.append(group(buckets["decay"], **wd))
    if buckets["no_decay"]:
        out.append(group(buckets["no_decay"], weight_decay=0.0))
    if buckets["free"]:
        out.append(group(buckets["free"], state_free=True, weight_decay=0.0))
    return out
