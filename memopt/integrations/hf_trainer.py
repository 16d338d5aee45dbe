"""Resume a Hugging Face ``Trainer`` from a memopt snapshot, and ``MemoptTrainer``.

HF's resume reads a ``checkpoint-N/`` directory: ``trainer_state.json`` (global step, epoch:
from these it skips the batches already seen), the weights, ``optimizer.pt`` (pickle),
``scheduler.pt`` and ``rng_state.pth``, restoring each at its own moment of ``train()``.
``resume(trainer)`` reuses that flow with memopt's snapshot as the source:

1. it writes ``<output_dir>/memopt-resume/trainer_state.json`` from the snapshot's
   ``extra["trainer_state"]`` (put there by ``MemoptCallback``) plus a marker naming the
   snapshot, and returns that directory for ``trainer.train(resume_from_checkpoint=...)``;
2. it replaces four loaders on this Trainer instance; each defers to HF's own for any other
   directory:
   - ``_load_from_checkpoint``: nothing yet (the optimizer does not exist at that point);
   - ``_load_optimizer_and_scheduler`` (after ``accelerator.prepare``): model, optimizer and
     LR scheduler from the snapshot via ``AsyncCheckpointer.load`` (checksums verified, resharded
     to this run's layout), and this rank's RNG states, which are then kept;
   - ``_load_rng_state`` (after the data skip, where HF restores RNG): those RNG states again,
     so the random stream continues exactly where the snapshot left it;
   - ``_load_scaler``: nothing (memopt snapshots hold no AMP scaler).

``MemoptTrainer`` = ``Trainer`` + ``create_optimizer`` from ``memopt_optimizer`` (see
``hf_optim``) + ``train(resume_from_checkpoint="memopt")``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from types import MethodType
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from memopt._utils import get_logger
from memopt.checkpoint import AsyncCheckpointer
from memopt.checkpoint.publish import rank_files, step_dir
from memopt.integrations._hf_checks import (
    check_arguments,
    check_hf_resume,
    check_meta_model,
    full_state_dict,
    warn_ignored_optim,
)
from memopt.integrations.accelerate import shard_under
from memopt.integrations.hf_callback import (
    MemoptCallback,
    trainer_state_json,
    unwrap_model,
    unwrap_optimizer,
)
from memopt.integrations.hf_optim import create_optimizer

log = get_logger("memopt.integrations.hf")
MARKER = "memopt_snapshot.json"
TRAINER_STATE = "trainer_state.json"


def find_callback(trainer: Any) -> MemoptCallback | None:
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, MemoptCallback):
            return cb
    return None


def _snapshot_extra(directory: str, step: int) -> dict[str, Any]:
    """Rank 0's ``extra`` of a published snapshot, read from its JSON skeleton only."""
    with open(os.path.join(step_dir(directory, step), rank_files(0)[1])) as f:
        extra: dict[str, Any] = json.load(f).get("extra") or {}
    return extra


def _rng_now() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    out["python"] = random.getstate()
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _rng_set(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _is_ours(path: Any) -> bool:
    """Whether ``path`` is the directory ``resume()`` returned (its marker file)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MARKER))


def _install_loaders(trainer: Any, ckpt: AsyncCheckpointer, step: int) -> None:
    cls = type(trainer)
    kept: dict[str, Any] = {}

    def load_model(self: Any, path: Any, model: Any = None) -> None:
        if not _is_ours(path):
            cls._load_from_checkpoint(self, path, model)

    def load_opt_sched(self: Any, path: Any) -> None:
        if not _is_ours(path):
            cls._load_optimizer_and_scheduler(self, path)
            return
        ckpt.load(
            step,
            model=unwrap_model(self.model),
            optimizer=unwrap_optimizer(self.optimizer),
            scheduler=self.lr_scheduler,
        )
        kept["rng"] = _rng_now()  # the snapshot's RNG, just restored by load
        log.warning("memopt: resumed model, optimizer and scheduler from snapshot step %d", step)

    def load_rng(self: Any, path: Any) -> None:
        if not _is_ours(path):
            cls._load_rng_state(self, path)
        elif "rng" in kept:
            _rng_set(kept["rng"])

    def load_scaler(self: Any, path: Any) -> None:
        if not _is_ours(path):
            cls._load_scaler(self, path)

    trainer._load_from_checkpoint = MethodType(load_model, trainer)
    trainer._load_optimizer_and_scheduler = MethodType(load_opt_sched, trainer)
    trainer._load_rng_state = MethodType(load_rng, trainer)
    trainer._load_scaler = MethodType(load_scaler, trainer)


def resume(
    trainer: Any,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    step: int | None = None,
) -> str | None:
    """Prepare ``trainer`` to resume from a memopt snapshot; returns the directory to pass as
    ``trainer.train(resume_from_checkpoint=...)``, or None when there is no snapshot yet.

    ``checkpoint_dir`` defaults to the ``MemoptCallback``'s (its ``checkpoint_dir``, or the
    directory of the ``checkpointer=`` it was given); ``step`` to the newest published
    snapshot. Call it on every rank, before ``train``.
    """
    cb = find_callback(trainer)
    directory = checkpoint_dir
    if directory is None and cb is not None:
        directory = cb.directory
    if directory is None:
        raise ValueError(
            "memopt resume: pass checkpoint_dir=... or add a MemoptCallback(checkpoint_dir=...) "
            "(or MemoptCallback(checkpointer=...)) to the Trainer"
        )
    directory = os.path.abspath(os.fspath(directory))
    ckpt = None
    if cb is not None and cb.directory is not None and os.path.abspath(cb.directory) == directory:
        ckpt = cb.ensure_checkpointer()  # the callback's own: its keep / fsync options
    ckpt = ckpt or AsyncCheckpointer(directory)
    if step is None:
        step = ckpt.latest()
        if step is None:
            log.warning("memopt: no snapshot in %s; training starts from step 0", directory)
            return None
    elif step not in ckpt.steps():
        raise FileNotFoundError(
            f"memopt resume: no published snapshot of step {step} in {ckpt.directory} "
            f"(published: {ckpt.steps()})"
        )
    state = trainer_state_json(_snapshot_extra(ckpt.directory, step))
    staging = os.path.join(trainer.args.output_dir, "memopt-resume")
    if trainer.args.process_index == 0:
        os.makedirs(staging, exist_ok=True)
        with open(os.path.join(staging, TRAINER_STATE), "w") as f:
            json.dump(state, f)
        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump({"directory": ckpt.directory, "step": step}, f)
    trainer.accelerator.wait_for_everyone()
    _install_loaders(trainer, ckpt, step)
    if cb is not None:
        cb.mark_resumed(step)  # already on disk: its train() does not snapshot it again
    log.warning("memopt: will resume from snapshot step %d in %s", step, ckpt.directory)
    return staging


def _place_meta(shard: dict[str, Any], model: Any, device: torch.device) -> dict[str, Any]:
    """``shard`` with a meta model materialized on ``device`` (the Trainer's, where its
    batches go) unless ``fsdp.init_device`` says otherwise: ``memopt.shard``'s own default
    is the CPU in a process without an NCCL group (one GPU, plain path)."""
    if not any(p.is_meta for p in model.parameters()):
        return shard
    from memopt.sharding import FSDPOptions

    fsdp = shard.get("fsdp") or FSDPOptions()
    if fsdp.init_device is None:
        fsdp = dataclasses.replace(fsdp, init_device=device)
    return {**shard, "fsdp": fsdp}


class MemoptTrainer(Trainer):
    """``Trainer`` whose optimizer is memopt's, built by ``hf_optim.create_optimizer``.

    ``memopt_optimizer``: ``"galore"``, ``"apollo"``, ``"apollo_mini"``, ``"frugal"``,
    ``"natural_galore"`` or ``"adamw"``; ``memopt_options``: its keywords (``rank=128``,
    ``target="attn|mlp"``, ``update_proj_gap=200``, ``optimizer_kwargs={...}``, ...).
    With no options, ``"galore"`` (the default) and the other rank-taking optimizers use
    ``optimizer.rank``'s Config default (128; APOLLO-Mini 1), FRUGAL ``density=0.25``.
    ``train(resume_from_checkpoint="memopt")`` resumes from the ``MemoptCallback``'s newest
    snapshot (``resume``); any other value behaves as in ``Trainer``. ``memopt_resume=True``
    (``checkpoint.resume`` in ``from_config``) makes ``"memopt"`` the default of ``train()``
    (``resume_from_checkpoint=False`` then starts from step 0).

    ``memopt_shard={"stage": 2, ...}`` (keywords of ``memopt.shard``): memopt partitions the
    optimizer state and gradients over the ranks instead of DDP. The model then goes through
    the Trainer's "already distributed" path (``prepare_model(evaluation_mode=True)``: autocast,
    no DDP wrapper); micro-batch accumulation reaches the sharded optimizer's ``no_sync`` and
    gradient clipping its global ``clip_grad_norm_`` (``accelerate.shard_under``). Save the
    optimizer with ``MemoptCallback`` snapshots: HF's ``optimizer.pt`` would hold rank 0's
    shard only, so HF saves the model only, and ``train(resume_from_checkpoint=True)`` from
    such a checkpoint is refused (``_hf_checks.check_hf_resume``). At stage 3 ``save_model``
    and HF's model checkpoints gather the DTensor shards to full weights (rank 0 writes).
    A model built on the meta device is taken with ``memopt_shard={"stage": 3, "fsdp":
    FSDPOptions(init_fn=model._init_weights)}`` (or modules with ``reset_parameters()``): HF's
    ``.to(device)`` is skipped and ``memopt.shard`` materializes it when training starts; any
    other meta model is refused at construction (``_hf_checks.check_meta_model``).

    ``log`` adds the callback's ``mem/*`` figures before HF logs (``log_history`` and
    ``report_to`` see them). HF's ``optim``, ``optim_args`` and ``optim_target_modules`` have
    no effect here: a warning names the memopt optimizer used instead.
    """

    def __init__(
        self,
        *args: Any,
        memopt_optimizer: str = "galore",
        memopt_options: dict[str, Any] | None = None,
        memopt_shard: dict[str, Any] | None = None,
        memopt_resume: bool = False,
        **kwargs: Any,
    ) -> None:
        self.memopt_resume = memopt_resume
        self.memopt_optimizer = memopt_optimizer
        self.memopt_options = dict(memopt_options or {})
        if memopt_shard is not None and not isinstance(memopt_shard, dict):
            raise TypeError(f"MemoptTrainer: memopt_shard must be a dict of memopt.shard "
                            f"keywords, e.g. {{'stage': 2}}, got {memopt_shard!r}")  # fmt: skip
        self.memopt_shard = None if memopt_shard is None else dict(memopt_shard)
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:  # before HF sets anything up or moves the model
            check_meta_model(model, self.memopt_shard)
        super().__init__(*args, **kwargs)
        if model is None and self.model is not None:  # (built by model_init)
            check_meta_model(self.model, self.memopt_shard)
        check_arguments(self)
        warn_ignored_optim(self)
        if self.memopt_shard is not None:
            # the model is placed already; accelerate must not wrap it in DDP (memopt reduces)
            self.is_distributed_loading_by_transformers = True

    def _move_model_to_device(self, model: Any, device: Any) -> None:
        # HF places the model in __init__ (and again in train() for model_init / fp16 full
        # eval) with model.to(device), which a meta-device model cannot take: memopt.shard
        # (stage 3) allocates and initializes it on the device instead, shard by shard, when
        # create_optimizer runs. A real model is placed by HF as usual.
        if check_meta_model(model, self.memopt_shard):
            return
        super()._move_model_to_device(model, device)

    def _check_materialized(self, what: str) -> None:
        model = self.model
        if self.memopt_shard is not None and model is not None and any(
            p.is_meta for p in model.parameters()
        ):
            raise RuntimeError(
                f"MemoptTrainer.{what}(): the model is still on the meta device (no weights): "
                "memopt_shard materializes it when training starts; call train() first"
            )

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._check_materialized("evaluate")
        return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self._check_materialized("predict")
        return super().predict(*args, **kwargs)

    @classmethod
    def from_config(
        cls, config: Any, *, args: Any = None, output_dir: str | None = None, **kwargs: Any
    ) -> MemoptTrainer:
        """A ``MemoptTrainer`` run by a ``memopt.Config`` (``hf_config``): optimizer, sharding,
        snapshots and activation budget from the Config; ``args`` (``TrainingArguments``)
        default to the Config's hyper-parameters, schedule and steps
        (``training_arguments(config)``) with ``output_dir``; other ``kwargs`` (``model``,
        ``train_dataset``, ``callbacks``, ...) go to the Trainer. With ``checkpoint.resume``
        (the default) and ``checkpoint.directory``, ``train()`` resumes from the newest
        snapshot there, if any."""
        from transformers import TrainingArguments

        from memopt.config.build import lr_lambda
        from memopt.integrations.hf_config import trainer_options, training_arguments

        options = trainer_options(config)
        callbacks = list(kwargs.pop("callbacks", None) or []) + options.pop("callbacks")
        derived = args is None
        if derived:
            args = TrainingArguments(
                output_dir=output_dir or "memopt-trainer", **training_arguments(config)
            )
        trainer = cls(args=args, callbacks=callbacks, **options, **kwargs)
        if derived:  # memopt run's schedule (its warm-up starts at lr / (w + 1), HF's at 0)
            trainer._memopt_lr_lambda = lr_lambda(config.optimizer, config.train.steps)
        return trainer

    _memopt_lr_lambda: Any = None

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self._memopt_lr_lambda is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        opt = self.optimizer if optimizer is None else optimizer
        assert opt is not None  # (HF creates the optimizer first)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, self._memopt_lr_lambda)
        return self.lr_scheduler

    def _sync_replicated_trainable_parameters(self, model: Any) -> None:
        if self.memopt_shard is None:
            super()._sync_replicated_trainable_parameters(model)
        # else: memopt.shard reduces every gradient itself; an extra all-reduce would double it

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            target: Any = self.model if model is None else model
            opt = create_optimizer(target, self.args, self.memopt_optimizer, **self.memopt_options)
            if self.memopt_shard is not None:
                module = unwrap_model(target)
                options = _place_meta(self.memopt_shard, module, self.args.device)
                _, opt = shard_under(self.accelerator, module, opt, **options)
            self.optimizer = opt
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        # stage 3: DTensor shards, which save_pretrained cannot write. Every rank is here
        # (save_model calls _save on each), so the gather, a collective, can run
        if state_dict is None and (full := full_state_dict(unwrap_model(self.model))) is not None:
            if not self.args.should_save:
                return  # (rank 0 writes the gathered weights)
            state_dict = full
        super()._save(output_dir, state_dict=state_dict)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """HF's ``log`` with the ``MemoptCallback``'s ``mem/*`` figures added first, so
        ``log_history`` and every callback (``report_to`` integrations too) see them; the
        caller's dict (what ``evaluate()`` returns) gets HF's keys only, as before."""
        cb = find_callback(self)
        if cb is None or not cb.log_memory:
            super().log(logs, start_time)
            return
        mem = cb.memory_figures()
        merged = {**logs, **mem}
        super().log(merged, start_time)
        logs.update({k: v for k, v in merged.items() if k not in mem})  # (HF adds "epoch")

    def train(  # type: ignore[override]
        self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any
    ) -> Any:
        if resume_from_checkpoint is None and self.memopt_resume:
            resume_from_checkpoint = "memopt"
        if resume_from_checkpoint == "memopt":
            resume_from_checkpoint = resume(self)
        elif resume_from_checkpoint and not _is_ours(resume_from_checkpoint):
            check_hf_resume(self, resume_from_checkpoint)  # (resume()'s directory: ours)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


__all__ = ["MemoptTrainer", "find_callback", "resume"]
