"""What ``OffloadedAdamW`` accepts, and how its fp32 masters follow writes to the parameters.

- ``check_adam_group``: a param group's hyperparameters (numbers, betas) and the torch AdamW
  options the offloaded step does not implement (``amsgrad``, ``maximize``, ``capturable``,
  ``differentiable``, Adam's L2 ``weight_decay``): refused, not ignored.
- ``checked_load``: a state dict, checked in full before ``load_state_dict`` changes anything
  (groups, hyperparameters, every state entry's tensors), so a refused load changes nothing.
- ``refresh_master``: the master of a parameter written since the last step (a weight clamp,
  ``model.load_state_dict``, an EMA swap-back, a checkpoint restore) is rebuilt from the
  parameter, upcast, unless the parameter equals the master rounded to its dtype (the same
  snapshot restored: its extra master bits are kept). The optimizer notes each parameter's
  ``signature`` (autograd version counter and storage address) after each step and load; only
  parameters whose signature moved are compared. Writes through ``p.data`` bypass the version
  counter and are not seen (write under ``torch.no_grad()`` instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memopt._utils.checks import finite_number

#: The per-parameter state key of fp32 master weights: OffloadedAdamW saves its masters
#: under it, and so does memopt.shard(master_dtype=...); memopt.optim drops it on load.
MASTER = "master"

__all__ = ["UNSUPPORTED_FLAGS", "check_adam_group", "checked_load", "label", "refresh_master",
           "signature"]  # fmt: skip

#: torch AdamW options the offloaded step does not implement (a truthy value is refused)
UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def label(t: Any) -> str:
    """A short name for a parameter (or a state key) in messages: shape and dtype, never the
    tensor's values."""
    if isinstance(t, Tensor):
        return f"a parameter of shape {tuple(t.shape)} ({t.dtype})"
    return f"key {t!r}"


def check_adam_group(group: dict[str, Any], owner: str) -> None:
    """lr, eps and weight_decay finite numbers >= 0 and betas two numbers in [0, 1) (torch
    refuses nan too; memopt's optimizers check the same in memopt.optim._groups); the flags
    of ``UNSUPPORTED_FLAGS`` and L2 weight decay (``decoupled_weight_decay=False``, torch's
    Adam) are a NotImplementedError."""
    flags = [k for k in UNSUPPORTED_FLAGS if group.get(k)]
    if flags:
        raise NotImplementedError(
            f"{owner}: the param group sets {flags}, which the offloaded AdamW step does not "
            "implement (it would silently run plain AdamW); remove them, or use "
            "torch.optim.AdamW for these parameters"
        )
    for key in ("lr", "eps", "weight_decay"):
        value = group[key]
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: {key} is a tensor ({value!r}); pass a Python float")
        group[key] = finite_number(value, key, owner)
    if group.get("decoupled_weight_decay") is False and group["weight_decay"]:
        raise NotImplementedError(
            f"{owner}: decoupled_weight_decay=False with weight_decay={group['weight_decay']} "
            "is Adam's L2 penalty in the gradient, not AdamW's decay; OffloadedAdamW runs "
            "AdamW only (use torch.optim.AdamW's state, or weight_decay=0)"
        )
    betas = group["betas"]
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}")
    group["betas"] = (b1, b2)


def checked_load(
    state_dict: dict[str, Any], groups: list[dict[str, Any]], params: list[Tensor]
) -> tuple[list[dict[str, Any]], list[tuple[Tensor, dict[str, Any]]]]:
    """(the new hyperparameters of each group, (parameter, saved state) per saved entry),
    once everything in ``state_dict`` is checked; raises before anything changes."""
    owner = "OffloadedAdamW.load_state_dict"
    saved_groups = state_dict["param_groups"]
    sizes = [len(g["params"]) for g in saved_groups]
    if sizes != [len(g["params"]) for g in groups]:
        raise ValueError(
            f"{owner}: the saved param groups (sizes {sizes}) do not match this optimizer's "
            f"({[len(g['params']) for g in groups]}); nothing was loaded"
        )
    values = []
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        trial = {k: v for k, v in group.items() if k != "params"}
        trial.update({k: v for k, v in saved.items() if k != "params"})
        check_adam_group(trial, f"{owner}: saved param group {i} (nothing was loaded)")
        values.append(trial)
    entries = []
    for index, st in state_dict["state"].items():
        i = int(index)
        if not 0 <= i < len(params):
            raise ValueError(f"{owner}: state for parameter index {i}, but this optimizer has "
                             f"{len(params)} parameters; nothing was loaded")  # fmt: skip
        p = params[i]
        for key in ("step", "exp_avg", "exp_avg_sq", MASTER):
            t = st.get(key)
            if t is None and key == MASTER:
                continue
            if key == "step" and t is not None and not isinstance(t, Tensor):
                continue
            if not isinstance(t, Tensor) or (key != "step" and t.numel() != p.numel()):
                got = f"{tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{owner}: the saved state of parameter {i} (shape {tuple(p.shape)}, "
                    f"{p.dtype}) has {key!r} = {got}; it needs torch AdamW's 'step', "
                    "'exp_avg' and 'exp_avg_sq' (and optionally 'master') of the parameter's "
                    "size. Load a state dict of this model's optimizer; nothing was loaded"
                )
        entries.append((p, st))
    return values, entries


def signature(p: Tensor) -> tuple[int, int]:
    """What moves when ``p`` is written: its version counter and its storage address."""
    return p._version, p.data_ptr()


@torch.no_grad()
def refresh_master(master: Tensor, param: Tensor) -> None:
    """``master`` (flat fp32, on the host) <- ``param`` (flat, any device), upcast, unless
    ``param`` is low precision and equals ``master`` rounded to its dtype (kept)."""
    if param.dtype != torch.float32:
        host = param if param.device.type == "cpu" else param.to("cpu")
        if torch.equal(master.to(host.dtype), host):
            return
    master.copy_(param)
