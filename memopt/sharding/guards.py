"""Refusals for inputs the sharded optimizers cannot run correctly, each with the way out.

- ``torch.amp.GradScaler``: it looks for inf/NaN gradients rank by rank, in the tensors of the
  optimizer's param groups, and calls ``step()`` only where it found none. Under ZeRO that is
  wrong twice: the groups hold this rank's shards, whose gradients exist only once ``step()``
  has reduced them (stages 2/3, master weights: GradScaler then fails with "No inf checks were
  recorded"), and an overflow seen on one rank skips the step there only (stage 1: that rank
  stops issuing the step's collectives, and the ranks then pair up collectives of different
  steps). memopt has no loss scaler of its own. The sharded optimizers therefore declare
  ``_step_supports_amp_scaling``: GradScaler then calls their ``step()`` itself, after setting
  ``grad_scale``/``found_inf`` on the optimizer, and ``refuse_grad_scaler`` raises there, the
  same on every rank and before anything is updated. Where GradScaler's own
  semantics hold (one process, each parameter stepped in place: the plain path) the flag is
  off and GradScaler works as with any torch optimizer.
- A ``state_dict`` that was not saved by a sharded optimizer (``check_sharded_state_dict``).
- A model whose parameters are already ``DTensor``\\ s (``check_not_distributed_tensors``).
- An optimizer whose ``step`` requires a closure (``torch.optim.LBFGS``:
  ``check_closure_optional``): the sharded step reduces the gradients once and then calls the
  inner ``step()`` without one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from memopt.sharding.config import ShardConfig

#: the attributes GradScaler.step sets on an optimizer with ``_step_supports_amp_scaling``
_SCALER_ATTRS = ("grad_scale", "found_inf")

_CHECKPOINT_ROUTE = (
    "memopt.checkpoint.AsyncCheckpointer reshards: save a snapshot with it (in one process, "
    "from the plain optimizer, or from any sharded run) and load() it into the sharded "
    "model and optimizer, at any world size, stage or layout (docs/checkpoint.md, Resharding)"
)


def refuse_grad_scaler(opt: Any, config: ShardConfig, world: int) -> None:
    """Raise if ``torch.amp.GradScaler.step`` called ``opt.step()`` (it set ``found_inf``):
    a clear error on every rank instead of a silent per-rank skip or torch's assertion."""
    if not any(a in vars(opt) for a in _SCALER_ATTRS):
        return
    for a in _SCALER_ATTRS:  # GradScaler deletes them only after a step that returned
        vars(opt).pop(a, None)
    where = f"stage {config.stage}, {world} rank(s), layout={config.layout!r}"
    if config.master_dtype is not None:
        where += f", master_dtype={config.master_dtype}"
    if config.offload is not None:
        where += ", offload"
    raise NotImplementedError(
        f"memopt.shard: torch.amp.GradScaler cannot drive this sharded optimizer ({where}). "
        "GradScaler checks for inf/NaN gradients on each rank separately and skips the step "
        "only where it found one, so one rank's overflow would make the ranks' collectives "
        "fall out of step (gradients of different steps averaged); and it never sees the "
        "gradients this optimizer reduces inside step(). memopt has no loss scaler: drop the "
        "GradScaler and call opt.step(), training in bf16 instead of fp16 "
        "(torch.autocast(device_type, dtype=torch.bfloat16) needs no loss scaling), or a bf16 "
        "model with fp32 master weights (memopt.shard(..., master_dtype=torch.float32)). "
        "Nothing was updated. (GradScaler does work on one process with "
        "layout='whole_tensor' and no master weights.)"
    )


def check_sharded_state_dict(state_dict: Any, expected: dict[str, Any]) -> None:
    """Raise before anything is loaded unless ``state_dict`` is a sharded optimizer's
    ``state_dict()`` of this very layout (``expected``: its ``sharding`` tag)."""
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"memopt.shard: load_state_dict takes the dict of a sharded optimizer's "
            f"state_dict(), got {type(state_dict).__name__}"
        )
    saved = state_dict.get("sharding")
    if saved is None:
        raise ValueError(
            "memopt.shard: this state_dict has no 'sharding' entry: it comes from an unsharded "
            "optimizer (a torch optimizer, or one process without memopt.shard), whose state "
            "is laid out for whole parameters, while a sharded optimizer loads only its own "
            f"per-rank state_dict, tagged with its sharding ({expected!r}); nothing was "
            f"loaded. {_CHECKPOINT_ROUTE}"
        )
    if saved != expected:
        raise ValueError(
            f"memopt.shard: this state_dict was saved with sharding {saved!r}, this optimizer "
            f"is {expected!r}; a sharded state_dict loads only on the same world size, rank, "
            f"stage and layout, and nothing was loaded. To change them: {_CHECKPOINT_ROUTE}"
        )


def check_not_distributed_tensors(model: nn.Module, stage: int) -> None:
    """``memopt.shard`` takes the plain model: FSDP2's ``fully_shard`` (or tensor
    parallelism) already made the parameters ``DTensor``\\ s, which stages 1/2 cannot view
    or bucket and stage 3 would shard a second time."""
    names = _dtensor_names(model.named_parameters())
    if names:
        raise ValueError(
            f"memopt.shard(stage={stage}): the model's parameters are already DTensors "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}: fully_shard or "
            "another parallelism was applied to it); pass "
            "the model before fully_shard. memopt.shard shards it itself: stages 1/2 over "
            "plain parameters, stage 3 by calling fully_shard (choose the units with "
            "FSDPOptions(modules=...)). To keep your own fully_shard, use the plain optimizer "
            "without memopt.shard"
        )


def _dtensor_names(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    from torch.distributed.tensor import DTensor

    return [n for n, p in named if isinstance(p, DTensor)]


def check_closure_optional(optimizer: Any) -> None:
    """Refuse an optimizer whose ``step`` cannot run without a closure (a required argument,
    as ``torch.optim.LBFGS.step(closure)``): before, ``memopt.shard`` took it and every step
    failed inside with LBFGS's own ``TypeError``, after the gradients were reduced."""
    try:  # the class's: an LR scheduler replaces the instance's step by a (*args) wrapper
        signature = inspect.signature(type(optimizer).step)
    except (TypeError, ValueError):  # (no signature to read: a builtin; let it through)
        return
    required = [
        name for name, arg in list(signature.parameters.items())[1:]  # (after self)
        if arg.default is inspect.Parameter.empty
        and arg.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]  # fmt: skip
    if required:
        name = type(optimizer).__name__
        raise NotImplementedError(
            f"memopt.shard: {name}.step requires {required} (a closure that re-evaluates the "
            "loss and gradients, several times per step for a line search); the sharded step "
            "cannot run it: it reduces the gradients across ranks once, then calls the inner "
            "optimizer's step() without a closure, so every step would fail. Optimizers that "
            "need a closure are not supported by memopt.shard: use "
            f"{name} without memopt.shard (with DistributedDataParallel on several ranks: its "
            "closure's backward all-reduces), or an optimizer whose closure is optional "
            "(torch.optim.AdamW, memopt.optim.*). Nothing was changed"
        )
