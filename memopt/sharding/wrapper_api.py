"""The ``torch.optim`` surface of the sharded optimizers that needs their plans.

- ``state_key``: what ``sharded.state[key]`` means (``memopt._utils.state_view``). A model
  parameter is translated to the tensor the inner optimizer steps for it on this rank: its
  row shard (``dim0``), its fp32 master copy (``master_dtype``), its stage-3 holder, or the
  parameter itself (an owned ``whole_tensor`` one). A parameter another rank steps has no
  state here: the view reads it as empty and refuses writes, naming the owner.
- ``drop_stray_state``: before ``state_dict`` packs the inner state, entries under tensors
  that are in no param group (left by code that indexed the inner optimizer's state directly)
  are dropped when empty and refused, by shape, when not: torch's packing failed on them with
  a bare ``KeyError: <id>``.
- ``checkpoint_layout``: the per-parameter layout ``memopt.checkpoint`` reshards with.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from memopt._utils.wrapped_optim import WrapperOptimizer
from memopt.sharding import master_state

__all__ = ["checkpoint_layout", "drop_stray_state", "state_key"]


def state_key(sharded: Any, key: Any) -> Tensor | str:
    """See the module docstring; a ``KeyError`` for a key that is no parameter of either."""
    by_param = sharded.__dict__.get("_plan_by_param")
    if by_param is None:  # (the plans never change after construction)
        by_param = sharded.__dict__["_plan_by_param"] = {id(p.param): p for p in sharded.plans}
    plan = by_param.get(id(key))
    if plan is None or plan.param is not key:
        return WrapperOptimizer.state_key(sharded, key)
    local = sharded.locals.get(plan.index)
    if local is not None:
        return local
    c = sharded.config
    name = sharded.names.get(id(plan.param), f"parameter {plan.index}")
    return (
        f"memopt.shard: {name!r} is stepped on rank {plan.owner} (stage {c.stage}, layout "
        f"{c.layout!r}, {sharded.comm.world} ranks): this rank ({sharded.comm.rank}) keeps no "
        f"optimizer state for it. Read it on rank {plan.owner}, or save a full checkpoint "
        "(memopt.checkpoint.AsyncCheckpointer) to see every rank's state"
    )


def drop_stray_state(optimizer: Any) -> None:
    """See the module docstring; ``optimizer`` is the sharded one's inner optimizer."""
    while isinstance(optimizer, WrapperOptimizer):
        optimizer = optimizer.inner
    state = optimizer.state
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    stray = [k for k in state if isinstance(k, Tensor) and id(k) not in grouped]
    kept = [k for k in stray if state[k]]
    if kept:
        shapes = [tuple(k.shape) for k in kept[:3]]
        keys = sorted(str(n) for n in state[kept[0]])
        raise ValueError(
            f"memopt.shard: state_dict: the inner optimizer's state has entries (keys {keys}) "
            f"under {len(kept)} tensor(s) of shapes {shapes} that are in no param group, so "
            "they cannot be saved (written through opt.inner.state with a tensor it does not "
            "step). Write state through opt.state[p] with the model's parameters, or delete "
            "those entries; nothing was saved"
        )
    for k in stray:  # (empty: created by a read; they carry nothing)
        del state[k]


def checkpoint_layout(sharded: Any) -> dict[str, Any]:
    """``ShardedOptimizer.checkpoint_layout`` (see there)."""
    me = sharded.comm.rank
    masters = master_state.held_masters(sharded)
    params = []
    for p in sharded.plans:
        s, e = p.row_range(me)
        params.append(
            {
                "index": p.index,
                "name": sharded.names.get(id(p.param), f"param.{p.index}"),
                "shape": [int(n) for n in p.param.shape],
                "owner": p.owner,
                "rows": [s, e],
                "held": p.index in sharded.locals,
                "master": p.index in masters,  # takes "master"
            }
        )
    return {
        "world_size": sharded.comm.world,
        "rank": me,
        "sharding": sharded._meta(),
        "params": params,
    }
