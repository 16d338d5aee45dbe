"""What ``MemoptTrainer`` checks and adapts around HF's ``Trainer``, kept apart from its flow.

- ``check_arguments``: the memopt optimizer name and options and the shard keywords, at
  construction (a test optimizer is built; its state is made lazily), and the combinations of
  ``memopt_shard`` with HF's arguments that cannot work; HF's DeepSpeed integration is refused
  outright (``hf_optim.deepspeed_refusal``: ZeRO flattens the parameters, or HF builds
  DeepSpeed's own optimizer);
- ``warn_ignored_optim``: HF's ``optim`` / ``optim_args`` / ``optim_target_modules`` have no
  effect on a ``MemoptTrainer`` (its optimizer is memopt's); say so and name what is used;
- ``check_hf_resume``: an HF ``checkpoint-N`` without optimizer state (``save_only_model``,
  which ``memopt_shard`` requires) would resume the weights and step but silently restart
  the optimizer and the LR schedule (warm-up again): refuse, pointing at memopt snapshots;
- ``check_meta_model``: a model built on the meta device (shapes, no storage) trains only
  through ``memopt_shard`` stage 3, which materializes it shard by shard when the optimizer is
  created; anything else is refused at construction, naming the fix;
- ``full_state_dict``: at stage 3 the parameters are FSDP2 ``DTensor`` shards, which HF's
  ``save_pretrained`` cannot write; gather the full tensors to rank 0's CPU (a collective:
  every rank calls it).
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

from torch import nn

from memopt.integrations.hf_optim import (
    OPTIMIZERS,
    _with_defaults,
    create_optimizer,
    deepspeed_refusal,
)

# TrainingArguments.optim values that mean plain AdamW (the default differs across versions)
_PLAIN_OPTIM = {"adamw_torch", "adamw_torch_fused"}


def check_arguments(trainer: Any) -> None:
    """The optimizer name and options and the shard keywords, checked at construction rather
    than at ``train()``; and ``memopt_shard`` against HF's own sharding and saving."""
    name, shard = trainer.memopt_optimizer, trainer.memopt_shard
    if trainer.is_deepspeed_enabled:
        raise ValueError(deepspeed_refusal(f"MemoptTrainer(memopt_optimizer={name!r})"))
    if name not in OPTIMIZERS:
        raise ValueError(f"MemoptTrainer: memopt_optimizer {name!r} unknown; choose one of "
                         f"{sorted(OPTIMIZERS)}")  # fmt: skip
    if shard is not None:
        from memopt.api import shard as shard_fn

        takes = set(inspect.signature(shard_fn).parameters) - {"model", "optimizer"}
        unknown = sorted(set(shard) - takes)
        if unknown:
            raise ValueError(f"MemoptTrainer: memopt_shard keys {unknown} unknown; "
                             f"memopt.shard takes {sorted(takes)}")  # fmt: skip
    if trainer.model is not None and trainer.optimizer is None:
        try:
            create_optimizer(trainer.model, trainer.args, name, **trainer.memopt_options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"MemoptTrainer(memopt_optimizer={name!r}, memopt_options=...): "
                          f"{e}") from None  # fmt: skip
    if shard is not None:
        _check_shard(trainer, shard)


def _check_shard(trainer: Any, shard: dict[str, Any]) -> None:
    args = trainer.args
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError(
            "MemoptTrainer(memopt_shard=...): memopt shards the optimizer itself; drop "
            "the Trainer's deepspeed/fsdp arguments"
        )
    if args.save_strategy != "no" and not args.save_only_model:
        raise ValueError(
            "MemoptTrainer(memopt_shard=...): HF's optimizer.pt would hold rank 0's "
            "shard only; pass save_only_model=True or save_strategy='no' and take "
            "optimizer snapshots with MemoptCallback"
        )
    if shard.get("stage", 2) == 3 and args.load_best_model_at_end:
        raise NotImplementedError(
            "MemoptTrainer(memopt_shard stage 3) with load_best_model_at_end=True: HF reloads "
            "the best checkpoint with load_state_dict, which the DTensor shards refuse; use "
            "stage 2, or after training load the best checkpoint-N (its model.safetensors "
            "holds the full weights) with from_pretrained"
        )
    if shard.get("stage", 2) == 3 and args.gradient_accumulation_steps > 1:
        raise NotImplementedError(
            "MemoptTrainer(memopt_shard stage 3) with gradient_accumulation_steps > 1: "
            "HF's loop then takes its own path for FSDP-managed models, which memopt's "
            "stage 3 is not; use stage 2 here, or memopt run / memopt.setup for stage "
            "3 with accumulation"
        )


def check_meta_model(model: nn.Module, shard: dict[str, Any] | None) -> bool:
    """True when ``model`` is on the meta device and ``shard`` can materialize it (stage 3,
    with an initializer for every module that holds tensors); False for a real model.
    ``ValueError`` naming the fix for a meta model that nothing would materialize."""
    from memopt.sharding.meta_init import check_meta, is_meta

    if not is_meta(model):
        return False
    stage = None if shard is None else shard.get("stage", 2)
    if stage != 3:
        got = "no memopt_shard" if shard is None else f"memopt_shard stage {stage}"
        raise ValueError(
            f"MemoptTrainer: the model is on the meta device (shapes only, no weights) and "
            f"{got} would materialize it: only memopt_shard={{'stage': 3, 'fsdp': "
            "memopt.sharding.FSDPOptions(init_fn=model._init_weights)} does (shard by shard, "
            "when training starts); pass that, or build the model on a real device"
        )
    fsdp = shard.get("fsdp") if shard is not None else None
    try:
        check_meta(model, getattr(fsdp, "init_fn", None))
    except ValueError as e:
        raise ValueError(f"MemoptTrainer(memopt_shard stage 3, meta-device model): {e}") from None
    return True


def warn_ignored_optim(trainer: Any) -> None:
    """Warn when the TrainingArguments ask HF for an optimizer that memopt's replaces."""
    if trainer.optimizer is not None:  # optimizers=(opt, ...) given: HF ignores them too
        return
    args = trainer.args
    optim = str(getattr(args.optim, "value", args.optim))
    ignored = [f"optim={optim!r}"] if optim not in _PLAIN_OPTIM else []
    if args.optim_args:
        ignored.append(f"optim_args={args.optim_args!r}")
    if args.optim_target_modules:
        ignored.append(f"optim_target_modules={args.optim_target_modules!r}")
    if not ignored:
        return
    name = trainer.memopt_optimizer
    used = dict(trainer.memopt_options)
    if name != "adamw":
        used = {"target": used.pop("target", "attn|mlp"), **_with_defaults(name, used)}
    warnings.warn(
        f"MemoptTrainer ignores the TrainingArguments {', '.join(ignored)}: the optimizer is "
        f"memopt's, memopt_optimizer={name!r} with {used} (other options at memopt's "
        "defaults; learning_rate, weight_decay, adam_beta1/2 and adam_epsilon do apply). Set "
        "memopt_optimizer= and memopt_options= instead (docs/migrating.md maps HF's optim "
        "names and optim_args keys)",
        UserWarning,
        stacklevel=3,
    )


def check_hf_resume(trainer: Any, checkpoint: Any) -> None:
    """Refuse an HF resume from ``checkpoint`` (a path, or True: the newest ``checkpoint-N``
    in ``output_dir``) that holds no optimizer state: HF would restart the optimizer and the
    LR schedule without a word."""
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(trainer.args.output_dir)  # (None: HF's own error)
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isdir(checkpoint):
        return
    if trainer.is_deepspeed_enabled or any(
        f.startswith("optimizer") for f in os.listdir(checkpoint)
    ):
        return
    why = (
        "memopt_shard requires save_only_model=True"
        if trainer.memopt_shard is not None
        else "it was saved with save_only_model=True"
    )
    raise ValueError(
        f"MemoptTrainer.train(resume_from_checkpoint=...): {os.fspath(checkpoint)} holds no "
        f"optimizer state (no optimizer.pt: {why}); HF would load the weights and the step "
        "but restart the optimizer state and the LR schedule (warm-up again) without a "
        "warning. Resume from a MemoptCallback snapshot with resume_from_checkpoint='memopt' "
        "(it holds the optimizer, every rank's shard, the scheduler and the RNG), or, to start "
        "afresh from those weights, load them into the model (from_pretrained) and call "
        "train() without resume_from_checkpoint"
    )


def full_state_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's full state dict on rank 0's CPU (empty on other ranks) when parameters
    are DTensor shards (stage 3); None when they are whole tensors (nothing to gather)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


__all__ = [
    "check_arguments",
    "check_hf_resume",
    "check_meta_model",
    "full_state_dict",
    "warn_ignored_optim",
]
