"""One ``memopt.Config`` for the Hugging Face ``Trainer`` too (the third way in, beside
``memopt.setup`` and ``memopt run``).

``training_arguments(config)`` gives the ``transformers.TrainingArguments`` keywords the Config
owns (learning rate, weight decay, betas, eps, clipping, warm-up, schedule, steps, batch size,
accumulation, ``train.seed`` -> ``seed``, ``train.log_every`` -> ``logging_steps``; a null
``optimizer.eps`` becomes the optimizer's own default, as ``memopt.setup`` leaves it), and
``MemoptTrainer.from_config`` replaces HF's scheduler by ``memopt run``'s (its warm-up starts
at lr / (w + 1), HF's at 0), so both run the same schedule step for step; HF's own arguments
(output directory, ...) are added by the caller. With sharding (stage >= 1, an offload tier
or fp32 master weights) it also sets ``save_strategy="no"``: HF's ``optimizer.pt`` would hold
rank 0's shard only, so memopt's snapshots (every ``checkpoint.every_n_steps`` and at the
last step) are the checkpoints. ``trainer_options(config)`` gives the ``MemoptTrainer`` keywords
(``memopt_optimizer``, ``memopt_options``, ``memopt_shard``, ``memopt_resume``) and the
``MemoptCallback`` for the checkpoint and activation sections; ``MemoptTrainer.from_config``
does both. In a Trainer HF builds the scheduler and clips, from these arguments.

The low-rank keywords (and ``optimizer.rank``'s null default: 128, or 1 for APOLLO-Mini) come
from ``memopt.config.build.low_rank_options``, the function ``memopt.setup`` uses.
``checkpoint.resume`` (default true) makes ``MemoptTrainer.train()`` resume from the newest
snapshot in ``checkpoint.directory`` when there is one, as ``memopt run`` does.

Config keys the Trainer path cannot honour raise a ``ValueError`` naming them, rather than
being dropped: ``optimizer.in_backward``, ``activations.policy`` / ``policies`` (the callback
runs the planner under ``activations.budget`` only) and ``checkpoint.redundancy`` (peer
copies need ``memopt.setup``'s process groups). The ``model`` and ``data`` sections are not
read: the Trainer is handed its model and dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from memopt.config import Config
from memopt.config.build import default_eps, low_rank_options, shard_config

__all__ = ["trainer_options", "training_arguments"]


def training_arguments(config: Config) -> dict[str, Any]:
    """``TrainingArguments`` keywords for what ``config`` sets (optimizer hyper-parameters,
    schedule, clipping, steps, per-device batch size, accumulation)."""
    o, t = config.optimizer, config.train
    kw: dict[str, Any] = {
        "learning_rate": o.lr,
        "weight_decay": o.weight_decay,
        "adam_beta1": o.betas[0],
        "adam_beta2": o.betas[1],
        "max_grad_norm": o.max_grad_norm if o.max_grad_norm is not None else 0.0,
        "warmup_steps": o.warmup_steps,
        "lr_scheduler_type": (
            "cosine_with_min_lr" if o.schedule == "cosine" else "constant_with_warmup"
        ),
        "max_steps": t.steps,
        "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "seed": t.seed,
        "logging_steps": t.log_every,
    }
    if config.model.device == "cpu" or (
        config.model.device == "auto" and not torch.cuda.is_available()
    ):  # as memopt.setup resolves it; under torchrun HF's Accelerator then runs MULTI_CPU (gloo)
        kw["use_cpu"] = True
    if _shard_options(config) is not None:
        # HF's optimizer.pt would hold rank 0's shard only (MemoptTrainer refuses it): the
        # checkpoints are memopt's snapshots (MemoptCallback, every_n_steps and the last step)
        kw["save_strategy"] = "no"
    if o.schedule == "cosine":
        kw["lr_scheduler_kwargs"] = {"min_lr_rate": o.min_lr_ratio}
    # null: the optimizer's own default, as memopt.setup leaves it (not HF's 1e-8)
    kw["adam_epsilon"] = o.eps if o.eps is not None else default_eps(o.name)
    return kw


def trainer_options(config: Config) -> dict[str, Any]:
    """``MemoptTrainer`` keywords for ``config``: ``memopt_optimizer``, ``memopt_options``,
    ``memopt_shard`` (None at stage 0 without offload or master weights), ``memopt_resume``
    (``checkpoint.resume`` with a directory) and ``callbacks`` (a ``MemoptCallback`` when a
    snapshot directory or an activation budget is set)."""
    _refuse(config)
    from memopt.integrations.hf_callback import MemoptCallback

    ck, ac = config.checkpoint, config.activations
    out: dict[str, Any] = {
        "memopt_optimizer": config.optimizer.name,
        "memopt_options": _optimizer_options(config),
        "memopt_shard": _shard_options(config),
        "memopt_resume": bool(ck.directory) and ck.resume,
        "callbacks": [],
    }
    if ck.directory or ac.budget:
        out["callbacks"].append(
            MemoptCallback(
                ck.directory,
                keep=ck.keep,
                every_n_steps=ck.every_n_steps or None,
                on_hf_save=bool(ck.directory),
                save_at_end=bool(ck.directory),
                fsync=ck.fsync,
                activation_budget=ac.budget,
                activation_options=_activation_options(config) if ac.budget else None,
            )
        )
    return out


def _activation_options(config: Config) -> dict[str, Any]:
    """``MemoptCallback.activation_options``: the planner's keywords, and ``options`` (the
    ``ActivationOptions`` of ``apply``) carrying ``activations.nvme_path``."""
    ac = config.activations
    opts: dict[str, Any] = {"actions": ac.actions, "tier": ac.tier}
    if ac.nvme_path:
        from memopt.activations import ActivationOptions
        from memopt.offload.nvme_file import NVMeConfig

        opts["options"] = ActivationOptions(nvme=NVMeConfig(directory=ac.nvme_path))
    return opts


def _optimizer_options(config: Config) -> dict[str, Any]:
    o = config.optimizer
    opts: dict[str, Any] = {}
    if o.name != "adamw":
        opts["target"] = o.target
        opts.update(low_rank_options(o))
    if o.state_dtype != "auto":
        opts["optimizer_kwargs"] = {"state_dtype": o.state_dtype}
    return opts


def _shard_options(config: Config) -> dict[str, Any] | None:
    sc = shard_config(config.sharding)
    if sc is None:
        return None
    fields = {f.name: getattr(sc, f.name) for f in dataclasses.fields(sc)}
    return {k: v for k, v in fields.items() if v is not None}


def _refuse(config: Config) -> None:
    bad = []
    if config.optimizer.in_backward:
        bad.append("optimizer.in_backward")
    if config.activations.policy or config.activations.policies:
        bad.append("activations.policy/policies (use activations.budget)")
    if config.checkpoint.redundancy != "none":
        bad.append("checkpoint.redundancy")
    if bad:
        raise ValueError(
            f"MemoptTrainer.from_config: {', '.join(bad)} cannot run inside a transformers "
            "Trainer; drop them from the config or use memopt.setup / memopt run"
        )
