"""One ``memopt.Config`` for the Hugging Face ``Trainer`` too (the third way in, beside
``memopt.setup`` and ``memopt run``).

``training_arguments(config)`` gives the ``transformers.TrainingArguments`` keywords the Config
owns (learning rate, weight decay, betas, eps, clipping, warm-up, schedule, steps, batch size,
accumulation), so the Trainer runs the same schedule as ``memopt run``; HF's own arguments
(output directory, logging, ...) are added by the caller. ``trainer_options(config)`` gives the
``MemoptTrainer`` keywords (``memopt_optimizer``, ``memopt_options``, ``memopt_shard``) and the
``MemoptCallback`` for the checkpoint and activation sections; ``MemoptTrainer.from_config``
does both. In a Trainer HF builds the scheduler and clips, from these arguments.

Config keys the Trainer path cannot honour raise a ``ValueError`` naming them, rather than
being dropped: ``optimizer.in_backward``, ``activations.policy`` / ``policies`` (the callback
runs the planner under ``activations.budget`` only) and ``checkpoint.redundancy`` (peer
copies need ``memopt.setup``'s process groups). The ``model`` and ``data`` sections are not
read: the Trainer is handed its model and dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memopt.config import Config
from memopt.config.build import shard_config

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
    }
    if o.schedule == "cosine":
        kw["lr_scheduler_kwargs"] = {"min_lr_rate": o.min_lr_ratio}
    if o.eps is not None:
        kw["adam_epsilon"] = o.eps
    return kw


def trainer_options(config: Config) -> dict[str, Any]:
    """``MemoptTrainer`` keywords for ``config``: ``memopt_optimizer``, ``memopt_options``,
    ``memopt_shard`` (None below stage 1 without offload) and ``callbacks`` (a
    ``MemoptCallback`` when a snapshot directory or an activation budget is set)."""
    _refuse(config)
    from memopt.integrations.hf_callback import MemoptCallback

    out: dict[str, Any] = {
        "memopt_optimizer": config.optimizer.name,
        "memopt_options": _optimizer_options(config),
        "memopt_shard": _shard_options(config),
        "callbacks": [],
    }
    ck, ac = config.checkpoint, config.activations
    if ck.directory or ac.budget:
        out["callbacks"].append(
            MemoptCallback(
                ck.directory,
                keep=ck.keep,
                every_n_steps=ck.every_n_steps or None,
                on_hf_save=bool(ck.directory),
                fsync=ck.fsync,
                activation_budget=ac.budget,
                activation_options={"actions": ac.actions, "tier": ac.tier} if ac.budget else None,
            )
        )
    return out


def _optimizer_options(config: Config) -> dict[str, Any]:
    o = config.optimizer
    opts: dict[str, Any] = {}
    if o.name != "adamw":
        opts["target"] = o.target
        opts["update_proj_gap"] = o.update_proj_gap
        if o.name == "frugal":
            opts["density"] = o.density
        elif o.rank is not None:
            opts["rank"] = o.rank
        for key in ("scale", "proj"):
            if getattr(o, key) is not None:
                opts[key] = getattr(o, key)
        if o.matmul_dtype != "auto":
            opts["matmul_dtype"] = o.matmul_dtype
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
