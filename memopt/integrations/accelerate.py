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

Four accelerate entry points are routed to memopt:

- ``accelerator.accumulate(model)`` / ``accelerator.no_sync(model)`` call ``model.no_sync()``
  on non-final micro-batches; ``model.no_sync`` is set to the sharded optimizer's ``no_sync``,
  so stage 2 keeps gradients local until the last micro-batch.
- ``accelerator.backward(loss)`` divides by the accumulation steps and calls
  ``loss.backward()``; memopt's post-accumulate-grad hooks reduce the gradients.
- ``accelerator.clip_grad_norm_(model.parameters(), max_norm)`` is replaced on this
  accelerator instance: for a memopt-prepared model it calls the sharded optimizer's
  ``clip_grad_norm_`` (the global norm over every rank's shards; torch's would see freed or
  partial ``param.grad``). Other parameters go to accelerate's own method.
- ``accelerator.get_state_dict(model)`` (which ``accelerator.save_model`` uses) is replaced on
  this accelerator instance too: for a memopt stage-3 model, whose parameters are FSDP2
  ``DTensor`` shards, it gathers the full tensors to rank 0's CPU (``{}`` on other ranks; a
  collective, so every rank calls it, as ``save_model`` does). Other models, and stages 1/2,
  go to accelerate's own method.

At stage 3 the model's ``save_pretrained`` without ``state_dict=`` (it would read the model's
own, sharded state dict and fail deep in safetensors) raises a ``ValueError`` naming the
working routes: ``save_pretrained(..., state_dict=accelerator.get_state_dict(model))`` or
``accelerator.save_model``.

Refused with an error naming the fix: an accelerator set up for DeepSpeed, FSDP, Megatron
or XLA (memopt does the sharding: launch without those plugins), and fp16 with a GradScaler
(use bf16, or memopt.shard's ``master_dtype``).
"""

from __future__ import annotations

import inspect
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


def _owner(owners: list[tuple[frozenset[int], Any]], model: nn.Module) -> Any:
    """The sharded optimizer that owns exactly ``model``'s parameters, or None."""
    ids = frozenset(id(p) for p in model.parameters())
    return next((sharded for owned, sharded in owners if owned == ids), None)


def _routes(accelerator: Any) -> list[tuple[frozenset[int], Any]]:
    """Install the memopt-aware ``clip_grad_norm_`` and ``get_state_dict`` on this accelerator
    (once); returns the list of ``(parameter ids, sharded optimizer)`` they consult."""
    owners: list[tuple[frozenset[int], Any]] | None = getattr(accelerator, "_memopt_owners", None)
    if owners is not None:
        return owners
    owners = []
    clip_original = accelerator.clip_grad_norm_
    state_original = accelerator.get_state_dict

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
        return clip_original(params, max_norm, norm_type)

    def get_state_dict(self: Any, model: nn.Module, unwrap: bool = True) -> Any:
        # stage 3: the parameters are DTensor shards; gather them (a collective: accelerate's
        # save_model calls this on every rank) to full CPU tensors on rank 0, {} elsewhere
        module = self.unwrap_model(model, keep_torch_compile=False)
        if _owner(owners, module) is not None:
            from memopt.integrations._hf_checks import full_state_dict

            full = full_state_dict(module)
            if full is not None:
                return full
        return state_original(model, unwrap)

    accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_, accelerator)
    accelerator.get_state_dict = MethodType(get_state_dict, accelerator)
    accelerator._memopt_owners = owners
    return owners


def _guard_save_pretrained(model: nn.Module) -> None:
    """At stage 3, ``model.save_pretrained(d)`` without ``state_dict=`` would read the model's
    own state dict (DTensor shards) and fail deep in safetensors; refuse it up front, naming
    the gathering routes. With ``state_dict=`` given it is HF's method unchanged."""
    from torch.distributed.tensor import DTensor

    method = getattr(type(model), "save_pretrained", None)
    if method is None or not any(isinstance(p, DTensor) for p in model.parameters()):
        return
    bound = MethodType(method, model)
    signature = inspect.signature(bound)

    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        if signature.bind(*args, **kwargs).arguments.get("state_dict") is None:
            raise ValueError(
                "save_pretrained on a memopt stage-3 model (memopt.shard stage 3): its "
                "parameters are DTensor shards, one piece per rank, and save_pretrained "
                "without state_dict= would write the model's own, sharded state dict. Gather "
                "the full weights on every rank (a collective) and pass them: "
                "model.save_pretrained(d, is_main_process=accelerator.is_main_process, "
                "save_function=accelerator.save, state_dict=accelerator.get_state_dict(model)), "
                "or call accelerator.save_model(model, d) on every rank; under MemoptTrainer "
                "use trainer.save_model()"
            )
        return bound(*args, **kwargs)

    model.__dict__["save_pretrained"] = save_pretrained


def shard_under(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: int = 2,
    layout: str | None = None,
    **shard_options: Any,
) -> tuple[nn.Module, Any]:
    """``memopt.shard`` plus the routes into it (``model.no_sync``, the accelerator's
    ``clip_grad_norm_`` and ``get_state_dict``, the stage-3 ``save_pretrained`` guard); the
    model must already be placed and not DDP-wrapped. Used by ``prepare`` and by
    ``MemoptTrainer(memopt_shard=...)``."""
    _check(accelerator)
    model, sharded = shard(model, optimizer, stage, layout, **shard_options)  # type: ignore[arg-type]
    model.__dict__["no_sync"] = sharded.no_sync  # accelerator.no_sync / accumulate use it
    owners = _routes(accelerator)
    owners.append((frozenset(id(p) for p in model.parameters()), sharded))
    _guard_save_pretrained(model)
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
