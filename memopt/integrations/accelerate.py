"""memopt under ``accelerate launch``: accelerate places, feeds and casts; memopt shards.

``prepare(accelerator, model, optimizer, *others, stage=2, ...)`` splits the work:

- accelerate: ``accelerator.prepare_model(model, evaluation_mode=True)`` moves the model to
  ``accelerator.device`` and applies its mixed-precision autocast and ``torch.compile``, but
  does *not* wrap it in DDP/FSDP (``evaluation_mode=True`` is the switch that skips the
  wrapper; transformers uses it the same way for models sharded at load time). Dataloaders,
  schedulers and anything else in ``others`` go through ``accelerator.prepare`` as usual.
- memopt: ``memopt.shard(model, optimizer, stage, ...)`` partitions optimizer state (stage 1),
  gradients (2) and parameters (3, FSDP2 underneath) over accelerate's process group; its
  optimizer is then wrapped by ``accelerator.prepare_optimizer`` (no state move), so
  ``step``/``zero_grad`` are skipped on accumulation micro-steps exactly as accelerate does.

Three accelerate entry points are routed to memopt:

- ``accelerator.accumulate(model)`` / ``accelerator.no_sync(model)`` call ``model.no_sync()``
  on non-final micro-batches; ``model.no_sync`` is set to the sharded optimizer's ``no_sync``,
  so stage 2 keeps gradients local until the last micro-batch.
- ``accelerator.backward(loss)`` divides by the accumulation steps and calls
  ``loss.backward()``; memopt's post-accumulate-grad hooks reduce the gradients.
- ``accelerator.clip_grad_norm_(model.parameters(), max_norm)`` is replaced on this
  accelerator instance: for a memopt-prepared model it calls the sharded optimizer's
  ``clip_grad_norm_`` (the global norm over every rank's shards; torch's would see freed or
  partial ``param.grad``). Other parameters go to accelerate's own method.

Refused with an error naming the fix: an accelerator set up for DeepSpeed, FSDP, Megatron
or XLA (memopt does the sharding: launch without those plugins), and fp16 with a GradScaler
(use bf16, or memopt.shard's ``master_dtype``).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memopt.api import shard

REFUSED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


def _check(accelerator: Any) -> None:
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    if kind in REFUSED:
        raise ValueError(
            f"memopt.integrations.accelerate.prepare: the accelerator is set up for {kind}; "
            "memopt does the sharding itself, so launch without the DeepSpeed/FSDP/Megatron "
            "plugin (plain `accelerate launch --num_processes N`, or --multi_gpu)"
        )
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world != int(accelerator.num_processes):
        raise ValueError(
            f"memopt.integrations.accelerate.prepare: torch.distributed has {world} ranks but the "
            f"accelerator sees {accelerator.num_processes} process(es). On CPU the "
            "accelerator must be made for CPU ranks (MULTI_CPU, gloo): Accelerator(cpu=True) "
            "when you create it; under the Hugging Face Trainer (MemoptTrainer) "
            "TrainingArguments(use_cpu=True), or ACCELERATE_USE_CPU=1 in the environment"
        )
    if getattr(accelerator, "scaler", None) is not None:
        raise NotImplementedError(
            "memopt.integrations.accelerate.prepare: fp16 with a GradScaler is not supported "
            "(the scaler would unscale only the local shards, and memopt has no loss scaler of "
            "its own); use mixed_precision='bf16', which needs no loss scaling, or bf16 "
            "weights with memopt.shard(master_dtype=torch.float32)"
        )


def _route_clipping(accelerator: Any) -> list[tuple[frozenset[int], Any]]:
    """Install the memopt-aware ``clip_grad_norm_`` on this accelerator (once)."""
    owners: list[tuple[frozenset[int], Any]] | None = getattr(accelerator, "_memopt_owners", None)
    if owners is not None:
        return owners
    owners = []
    original = accelerator.clip_grad_norm_

    def clip_grad_norm_(
        self: Any, parameters: Iterable[Any], max_norm: float, norm_type: float = 2
    ) -> Any:
        params = list(parameters)
        ids = frozenset(id(p) for p in params)
        for owned, sharded in owners:
            if ids == owned:
                self.unscale_gradients()
                return sharded.clip_grad_norm_(max_norm, norm_type)
            if ids & owned:
                raise NotImplementedError(
                    "accelerator.clip_grad_norm_: memopt clips by the global norm of all of a "
                    f"model's parameters; got {len(ids & owned)} of its {len(owned)}. Pass "
                    "model.parameters()"
                )
        return original(params, max_norm, norm_type)

    accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_, accelerator)
    accelerator._memopt_owners = owners
    return owners


def shard_under(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: int = 2,
    layout: str | None = None,
    **shard_options: Any,
) -> tuple[nn.Module, Any]:
    """``memopt.shard`` plus the two routes into it (``model.no_sync``, the accelerator's
    ``clip_grad_norm_``); the model must already be placed and not DDP-wrapped. Used by
    ``prepare`` and by ``MemoptTrainer(memopt_shard=...)``."""
    _check(accelerator)
    model, sharded = shard(model, optimizer, stage, layout, **shard_options)  # type: ignore[arg-type]
    model.__dict__["no_sync"] = sharded.no_sync  # accelerator.no_sync / accumulate use it
    owners = _route_clipping(accelerator)
    owners.append((frozenset(id(p) for p in model.parameters()), sharded))
    return model, sharded


def prepare(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *others: Any,
    stage: int = 2,
    layout: str | None = None,
    **shard_options: Any,
) -> tuple[Any, ...]:
    """``(model, optimizer, *others)`` ready to train: see the module docstring.

    Call it on every rank in place of ``accelerator.prepare(model, optimizer, ...)``, with the
    optimizer built on the model's parameters (memopt's or torch's) before its first step.
    ``stage``, ``layout`` and ``shard_options`` (``offload="cpu"``, ``master_dtype=...``,
    ``bucket_bytes=...``, ``deepspeed_config=...``) go to ``memopt.shard``. Returns the model
    (not DDP-wrapped), accelerate's wrapper of the sharded optimizer (``.optimizer`` is the
    ``memopt.sharding.ShardedOptimizer``), then ``others`` prepared by accelerate.
    """
    _check(accelerator)
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"prepare: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    model = accelerator.prepare_model(model, evaluation_mode=True)
    model, sharded = shard_under(accelerator, model, optimizer, stage, layout, **shard_options)
    wrapped = accelerator.prepare_optimizer(sharded, device_placement=False)
    rest = accelerator.prepare(*others) if others else ()
    if len(others) == 1:
        rest = (rest,)
    return (model, wrapped, *rest)


__all__ = ["prepare", "shard_under"]
