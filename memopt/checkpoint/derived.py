"""Optimizer state that a load would derive from the parameters' current values.

``loading.restore_all`` loads the optimizer before it copies the model's weights (the
optimizer's own ``load_state_dict`` may still refuse the snapshot, and then nothing may have
changed). One optimizer reads its parameters on load: ``OffloadedAdamW`` takes the parameter
as its fp32 master when the saved state has no ``master`` (a torch.optim.AdamW snapshot, or
one saved by ``memopt.shard`` without ``offload=``). Loaded first, it would take the weights
the model had before the load. ``fill_masters`` puts the snapshot's weights (cast to the
parameter's dtype, the bits the model copy writes) into such state instead, so the result is
the one of loading the model first. ``takes_masters`` says whether an optimizer takes a
saved ``master`` at all (``restore`` drops it from the state of any other, see there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt._utils.wrapped_optim import WrapperOptimizer
from memopt.checkpoint import layout as L
from memopt.checkpoint.reader import Snapshot
from memopt.offload.adamw_checks import MASTER
from memopt.offload.optimizer import OffloadedAdamW


def takes_masters(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` (looking through memopt's wrappers) takes a saved ``master`` for every
    parameter: an ``OffloadedAdamW``. A sharding optimizer keeping masters of some parameters
    says which in its ``checkpoint_layout()`` (``ParamLayout.master``)."""
    while isinstance(opt, WrapperOptimizer):
        opt = opt.inner
    return isinstance(opt, OffloadedAdamW)


def fill_masters(
    snap: Snapshot,
    opt: torch.optim.Optimizer,
    model: nn.Module | None,
    sd: dict[str, Any],
    written: set[str],
    rank: int,
    world: int,
) -> None:
    """Add ``master`` to each state of ``sd`` that lacks it, for an ``OffloadedAdamW`` (also
    inside memopt's wrappers), from the snapshot's model tensor the load writes (``written``:
    snapshot keys); parameters the load does not write keep their current values as master."""
    inner = opt
    while isinstance(inner, WrapperOptimizer):
        inner = inner.inner
    if not isinstance(inner, OffloadedAdamW):
        return
    live = L.plain_params(inner)
    params, _ = L.optimizer_layout(opt, model, rank, world)
    for p in params:
        st = sd["state"].get(p.index)
        key = f"model.{p.name}"
        if st is None or MASTER in st or key not in written:
            continue
        dst = live[p.index]
        rows = snap.rows(key, *p.rows) if snap.shapes[key] else snap.full(key)
        if rows.numel() == dst.numel():  # (else the parameter is not that tensor's rows)
            st[MASTER] = rows.to(dtype=dst.dtype).reshape(dst.shape)
