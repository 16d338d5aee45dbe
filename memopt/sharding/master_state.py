"""The fp32 master copies of ``memopt.shard(master_dtype=...)`` in the optimizer's state dict.

A bf16/fp16 model stepped through fp32 masters (stages 1/2, and stage 3 on one rank) keeps
bits in the masters that its weights do not have. ``ShardedOptimizer.state_dict`` puts each
master this rank holds (its rows of a row-sharded parameter, or the whole owned parameter)
into that parameter's per-parameter state under ``"master"``: the key ``OffloadedAdamW``
saves its fp32 masters under, so either kind of snapshot loads into the other.
``load_state_dict`` takes the masters out before the inner optimizer sees the state (which
would keep or refuse an unknown key) and copies them into the master tensors once the inner
load succeeded; a state dict without them (older snapshots, runs without ``master_dtype``)
loads as before: the masters are rebuilt from the weights.

A checkpoint restore loads the optimizer before it copies the weights, and the copy moves
every parameter's version counter, which otherwise means "written from outside: rebuild the
master from the weights" (``refresh``). So the masters just loaded are kept through one such
version change when the parameter then equals its master rounded to the parameter's dtype
(the bits the restore writes); a parameter that differs (a manual edit, other weights loaded)
rebuilds its master as before. That comparison is made once, at the first step after the load,
and only for parameters whose version moved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memopt.offload.adamw_checks import MASTER

__all__ = ["MASTER", "add_masters", "held_masters", "load_masters", "refresh", "split_masters"]



def held_masters(opt: Any) -> dict[int, tuple[Tensor, Tensor]]:
    """Plan index -> (parameter, the rows of it its master copies); empty without masters
    (``FSDPOptimizer`` keeps none: FSDP2 holds its sharded parameters in the master dtype)."""
    masters: dict[int, tuple[Tensor, Tensor]] = getattr(opt, "_master_of", {})
    return masters


def add_masters(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` (the inner optimizer's state dict) with each held master in its parameter's
    state: the live tensor, not a copy, as torch's ``state_dict`` shares the moments (a
    checkpoint copies it in the background before the next step; no model-sized fp32 copy per
    save). Only parameters with state get one: a parameter never stepped has the master its
    weights give (the rebuild a load makes is exact there)."""
    state = sd["state"]
    for index in held_masters(opt):
        st = state.get(index)
        if st is not None:
            state[index] = {**st, MASTER: opt.locals[index].detach()}
    return sd


def split_masters(opt: Any, sd: dict[str, Any]) -> tuple[dict[str, Any], dict[int, Tensor]]:
    """(``sd`` without the masters of parameters this optimizer keeps a master of, those
    masters by plan index), each checked against its master's shape: a ``ValueError`` before
    anything is loaded. ``sd`` itself is left as it is; other ``master`` entries (an
    ``OffloadedAdamW`` inner optimizer's own) stay for the inner optimizer."""
    held = held_masters(opt)
    state = sd.get("state")
    if not held or not isinstance(state, dict):
        return sd, {}
    out: dict[Any, Any] = dict(state)
    masters: dict[int, Tensor] = {}
    for key, st in state.items():
        index = int(key)
        if index not in held or not isinstance(st, dict) or MASTER not in st:
            continue
        m, dst = st[MASTER], opt.locals[index]
        if not isinstance(m, Tensor) or not m.is_floating_point() or m.shape != dst.shape:
            got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
            name = opt.names.get(id(held[index][0]), f"#{index}")
            raise ValueError(
                f"memopt.shard: the saved state of parameter {name!r} holds {MASTER!r} "
                f"({got}), but its master copy on this rank is {dst.dtype} {tuple(dst.shape)}: "
                "the state dict is from another layout, world size or model. Load a state dict "
                "saved by this setup, or reshard a snapshot with memopt.checkpoint "
                "(AsyncCheckpointer.load); nothing was loaded"
            )
        masters[index] = m
        out[key] = {k: v for k, v in st.items() if k != MASTER}
    return {**sd, "state": out}, masters


@torch.no_grad()
def load_masters(opt: Any, masters: dict[int, Tensor]) -> None:
    """Copy loaded ``masters`` into the master tensors; each is kept through the next
    version change of its parameter that leaves the parameter equal to it rounded."""
    loaded: set[int] = opt.__dict__.setdefault("_loaded_masters", set())
    for index, m in masters.items():
        opt.locals[index].copy_(m)
        param, _ = held_masters(opt)[index]
        opt._versions[index] = param._version  # only changes after this load count
        loaded.add(index)


@torch.no_grad()
def refresh(opt: Any) -> None:
    """Before a step: rebuild the master of each parameter written since the last step
    (``model.load_state_dict``, a restore, a manual edit) from the parameter, upcast (the
    low-precision values, as a resume from them implies), unless its master was just loaded
    and the parameter holds exactly that master rounded (see the module docstring)."""
    loaded: set[int] = opt.__dict__.get("_loaded_masters", set())
    for i, (param, rows) in held_masters(opt).items():
        if param._version == opt._versions[i]:
            continue
        master = opt.locals[i]
        if i in loaded and torch.equal(rows, master.to(rows.dtype)):
            continue
        master.copy_(rows)
    loaded.clear()
