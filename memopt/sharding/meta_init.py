"""Stage 3 from a model built on the meta device: no rank ever holds the whole model.

A user builds the model under ``torch.device("meta")`` (shapes only, no storage) and the
optimizer over those parameters, then calls ``memopt.shard(model, opt, stage=3)``. After
``fully_shard`` has replaced every parameter by a (still meta) ``DTensor`` row shard,
``materialize`` allocates each rank's local shards on the target device (``to_empty``) and
initializes the model **one module at a time**: the module's own parameters are swapped for
full-size temporary tensors, ``init_fn(module)`` fills them (default: the module's
``reset_parameters()``), and each rank copies its rows (FSDP2's ``Shard(0)`` split: rank r
holds rows ``[r c, min((r+1) c, rows))``, ``c = ceil(rows / W)``) into its shard; the
temporaries are dropped. Peak host/device memory is the local shards plus the largest single
module's full parameters, never the whole model.

Every rank runs the same initializer on the same full tensors, so with the same seed on all
ranks the shards are consistent, and the values equal an eager single-process build whenever
the model's constructor initializes modules in ``named_modules()`` order (true of plain
``nn.Linear`` stacks). A Hugging Face model needs ``init_fn=hf_model._init_weights``: its
weights are then a draw from the same initializer, not the eager build's exact values (that
constructor first consumes the RNG in each ``nn.Linear``'s own reset). Buffers are allocated
by ``to_empty`` and filled by the same ``init_fn`` call (they are not sharded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memopt.sharding.plan import chunk_rows

InitFn = Callable[[nn.Module], None]


def is_meta(model: nn.Module) -> bool:
    """True when any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def check_meta(model: nn.Module, init_fn: InitFn | None) -> None:
    """A meta model must be all-meta, and every module holding tensors needs an initializer."""
    real = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if not t.is_meta]
    if real:
        raise ValueError(
            f"memopt.shard: the model is partly on the meta device ({real[:3]} are not); build "
            "all of it under torch.device('meta') or none of it"
        )
    if init_fn is not None:
        return
    lacking = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if _holds_tensors(m) and not callable(getattr(m, "reset_parameters", None))
    ]
    if lacking:
        raise ValueError(
            f"memopt.shard: the model is on the meta device and modules {lacking[:4]} have no "
            "reset_parameters() to initialize them; pass FSDPOptions(init_fn=...) (for a Hugging "
            "Face model: init_fn=model._init_weights)"
        )


def _holds_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(
        True for _ in m.buffers(recurse=False)
    )


def _reset(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def materialize(
    model: nn.Module, device: torch.device, rank: int, world: int, init_fn: InitFn | None
) -> None:
    """Allocate ``model``'s DTensor shards on ``device`` and initialize them module by module."""
    from torch.distributed.tensor import DTensor

    init = init_fn or _reset
    model.to_empty(device=device)
    for module in model.modules():
        if not _holds_tensors(module):
            continue
        own = dict(module.named_parameters(recurse=False))
        full = {
            name: nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
            )
            for name, p in own.items()
        }
        module._parameters.update(full)
        try:
            with torch.no_grad():
                init(module)
        finally:
            module._parameters.update(own)
        with torch.no_grad():
            for name, p in own.items():
                value = full[name]
                if isinstance(p, DTensor):
                    rows = p.shape[0] if p.dim() else 0
                    start, end = chunk_rows(rows, -(-rows // world), rank)
                    p.to_local().copy_(value[start:end] if p.dim() else value)
                else:
                    p.copy_(value)


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The optimizer's parameters by model name, per group (to find them again once
    ``fully_shard`` or ``to_empty`` has replaced the parameter objects)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def rebind(model: nn.Module, optimizer: torch.optim.Optimizer, order: list[list[str]]) -> None:
    """Point the optimizer's groups at the model's current parameter objects, by name."""
    new = dict(model.named_parameters())
    for group, names in zip(optimizer.param_groups, order, strict=True):
        group["params"] = [new[n] for n in names]
