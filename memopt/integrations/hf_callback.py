"""``MemoptCallback``: memopt's async snapshots and per-tier memory logs inside HF ``Trainer``.

Snapshots: when the Trainer saves (``on_save``, by ``save_strategy``/``save_steps``) and/or
every ``every_n_steps`` optimizer steps (then ``save_strategy="no"`` skips HF's own
synchronous checkpoint entirely), and with ``save_at_end`` at the last step. Each snapshot
holds the unwrapped model, the real optimizer (under accelerate's ``AcceleratedOptimizer``),
the LR scheduler, the RNG states and the ``TrainerState`` as JSON (``extra["trainer_state"]``),
which ``resume`` turns back into a Trainer resume.

When: HF logs, evaluates (``best_metric``, early-stopping counters) and saves a step *after*
``on_step_end``, so a snapshot due at step n (``every_n_steps``, ``save_at_end``) is only
marked there and taken once that TrainerState is complete, at the first of: ``on_save`` of
that step (HF's own checkpoint moment), the next ``on_step_begin`` / ``on_epoch_begin``, or,
when training stops, the end-of-training log (before ``load_best_model_at_end`` reloads
weights). Parameters and optimizer state do not change in between (no optimizer step).

``save`` only captures references; the copy to host runs while the next forward/backward do,
and is fenced before the next optimizer step by two hooks:

- the checkpointer's own step pre-hook, registered on the optimizer it was given (the inner
  one, whose ``step`` the wrapper calls, so it fires on every real step);
- ``on_pre_optimizer_step`` calls ``fence()`` too, which also covers gradient clipping and any
  callback that runs between HF's clip and ``optimizer.step()``.

A snapshot taken when training stops is fenced at once (the Trainer may reload the best
weights in place). ``on_train_end`` waits until the last snapshot is published (raising a
background failure). ``on_train_begin`` forgets the previous ``train()``'s steps: HF counts
from 0 again, and its snapshots are overwritten.

``on_log`` logs host RSS, CUDA allocated (when CUDA is in use) and the checkpointer's and
offload tiers' arena bytes, records them in ``memory_history`` and adds them to that log's
``state.log_history`` entry (``MemoptTrainer.log`` puts them in the logs themselves, before
any callback or ``report_to`` integration sees them).

``activation_budget`` (bytes, ``"6GiB"``, ``"50%"``): in ``on_train_begin`` the activation
planner profiles the model on the first training samples and installs its per-block plan
(``_activations.apply_budget``); ``close()`` removes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

from torch import nn
from transformers import TrainerCallback

from memopt._utils import get_logger
from memopt.checkpoint import AsyncCheckpointer
from memopt.config.setup import close_all
from memopt.integrations._activations import apply_budget, first_batch
from memopt.integrations._memory import format_memory, memory_by_tier

log = get_logger("memopt.integrations.hf")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that really steps: accelerate's ``AcceleratedOptimizer`` holds it."""
    while type(optimizer).__module__.startswith("accelerate.") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_model(model: Any) -> nn.Module:
    """Strip DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class MemoptCallback(TrainerCallback):
    """Async memopt snapshots in ``checkpoint_dir`` (``keep`` newest) plus memory logs.

    ``on_hf_save``: snapshot when the Trainer saves. ``every_n_steps``: snapshot every n
    optimizer steps regardless. ``save_at_end``: snapshot the last step (``max_steps``) too,
    even when the Trainer does not save (``save_strategy="no"``). Those two wait until HF
    has logged, evaluated and saved the step (module docstring). ``checkpoint_options``:
    ``memopt.checkpoint.CheckpointConfig`` fields (``fsync=False`` for tests,
    ``max_inflight``, ...). ``activation_budget`` and ``activation_options``
    (``memopt.activations.plan`` keywords, and ``options``: the ``ActivationOptions`` given to
    ``apply``, e.g. ``nvme=`` for ``tier="nvme"``): see the module docstring. The
    checkpointer is created in ``on_train_begin`` (after the Trainer set up the process
    group), or pass ``checkpointer=``.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep: int = 3,
        *,
        every_n_steps: int | None = None,
        on_hf_save: bool = True,
        save_at_end: bool = False,
        log_memory: bool = True,
        checkpointer: AsyncCheckpointer | None = None,
        activation_budget: int | str | None = None,
        activation_options: dict[str, Any] | None = None,
        **checkpoint_options: Any,
    ) -> None:
        snaps = every_n_steps or on_hf_save or save_at_end
        if checkpoint_dir is None and checkpointer is None and snaps:
            raise ValueError(
                "MemoptCallback: pass checkpoint_dir=... (or checkpointer=...) to take snapshots, "
                "or every_n_steps=None and on_hf_save=False to only log memory"
            )
        if checkpoint_dir is not None and checkpointer is not None:
            raise ValueError(
                "MemoptCallback: pass checkpoint_dir=... or checkpointer=..., not both (the "
                f"checkpointer writes to {checkpointer.directory})"
            )
        if checkpointer is not None and (checkpoint_options or keep != 3):
            raise ValueError("MemoptCallback: checkpoint options (keep, ...) go to the "
                             "checkpointer you pass, not here")  # fmt: skip
        if checkpoint_options or keep != 3:  # a typo fails now, not at train()
            import dataclasses
            import inspect

            from memopt.checkpoint import CheckpointConfig

            plain = {k: v for k, v in checkpoint_options.items()
                     if k in {f.name for f in dataclasses.fields(CheckpointConfig)}}  # fmt: skip
            # AsyncCheckpointer's own keywords, from its signature (not a copy of the list)
            takes = set(inspect.signature(AsyncCheckpointer).parameters) - {"directory", "options"}
            unknown = sorted(set(checkpoint_options) - set(plain) - takes)
            if unknown:
                raise ValueError(f"MemoptCallback: unknown checkpoint option(s) {unknown}; "
                                 "AsyncCheckpointer takes CheckpointConfig's fields, config=, "
                                 "metadata=, redundancy=")  # fmt: skip
            CheckpointConfig(keep=keep, **plain)
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"MemoptCallback: every_n_steps must be an int >= 1, got {every_n_steps!r}"
            )
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.keep = keep
        self.every_n_steps = every_n_steps
        self.on_hf_save = on_hf_save
        self.save_at_end = save_at_end
        self.log_memory = log_memory
        self.checkpoint_options = checkpoint_options
        self.checkpointer = checkpointer
        if activation_budget is not None:  # checked now, not at on_train_begin
            from memopt.activations.planner import parse_budget

            parse_budget(activation_budget, 1 << 30)
        self.activation_budget = activation_budget
        self.activation_options = dict(activation_options or {})
        self.activations: Any = None  # the ActivationManager once on_train_begin installed it
        self.memory_history: list[dict[str, float]] = []
        self.saved_steps: list[int] = []  # this train()'s snapshots (and the resumed step)
        self.resumed_step: int | None = None  # set by ``resume`` for the next train()
        self._resuming = False  # ``resume`` ran and its train() has not begun yet
        self._due: int | None = None  # a step whose snapshot waits for its full TrainerState
        self._epoch_over = False  # between on_epoch_end and the next on_epoch_begin
        self._warned_never_saving = False  # (on_train_begin warns once per callback)

    # -- checkpointer ---------------------------------------------------------------------
    @property
    def directory(self) -> str | None:
        """The snapshot directory: ``checkpoint_dir``, or the given ``checkpointer``'s."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return None if self.checkpointer is None else str(self.checkpointer.directory)

    def ensure_checkpointer(self) -> AsyncCheckpointer | None:
        if self.checkpointer is None and self.checkpoint_dir is not None:
            self.checkpointer = AsyncCheckpointer(
                self.checkpoint_dir, keep=self.keep, **self.checkpoint_options
            )
        return self.checkpointer

    def mark_resumed(self, step: int) -> None:
        """``resume`` calls this: the next ``train()`` starts from snapshot ``step``, which is
        on disk already (not taken again)."""
        self.resumed_step, self._resuming = step, True

    def snapshot(
        self, state: Any, model: Any, optimizer: Any, scheduler: Any, *, final: bool = False,
        drop_last_log: bool = False,
    ) -> None:  # fmt: skip
        """Take one snapshot at ``state.global_step`` (skipped if that step is already saved).

        ``final``: training stops after this (fence now). ``drop_last_log``: leave the newest
        ``log_history`` entry out of the saved TrainerState (the end-of-training summary)."""
        ckpt = self.ensure_checkpointer()
        step = int(state.global_step)
        if ckpt is None or step in self.saved_steps:
            return
        saved = dataclasses.asdict(state)
        if drop_last_log and saved["log_history"]:
            saved["log_history"] = saved["log_history"][:-1]
        ckpt.save(
            step,
            model=unwrap_model(model),
            optimizer=None if optimizer is None else unwrap_optimizer(optimizer),
            scheduler=scheduler,
            extra={"trainer_state": json.dumps(saved, sort_keys=True)},
        )
        self.saved_steps.append(step)
        if final or (state.max_steps and step >= state.max_steps):
            # no next optimizer step will fence it, and the Trainer may change the weights in
            # place at the end (load_best_model_at_end): finish the host copy now
            ckpt.fence()
        log.info("memopt: snapshot of step %d started in %s", step, ckpt.directory)

    def _take_due(self, state: Any, kw: dict[str, Any], **how: bool) -> None:
        """Take the snapshot marked at ``on_step_end``, now that its step is complete."""
        if self._due is None:
            return
        if self._due != state.global_step:  # (a step cannot pass without on_step_begin)
            raise RuntimeError(
                f"MemoptCallback: the snapshot of step {self._due} was not taken before step "
                f"{state.global_step}; please report this"
            )
        self._due = None
        self.snapshot(state, kw.get("model"), kw.get("optimizer"), kw.get("lr_scheduler"), **how)

    # -- events ---------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # HF counts from step 0 (or the resumed step) again on every train(): the previous
        # run's steps are overwritten, not "already saved"
        if not self._resuming:
            self.resumed_step = None
        self.saved_steps = [] if self.resumed_step is None else [self.resumed_step]
        self._resuming, self._due, self._epoch_over = False, None, False
        self.ensure_checkpointer()
        self._warn_if_never_saving(args)
        if self.activation_budget is not None and self.activations is None:
            model = unwrap_model(kw["model"])
            device = next(model.parameters()).device
            batch = first_batch(kw["train_dataloader"], args.per_device_train_batch_size, device)
            self.activations = apply_budget(
                model, batch, self.activation_budget, **self.activation_options
            )
        if self.resumed_step is not None:
            log.warning(
                "memopt: resumed from snapshot step %d in %s (trainer global_step %d)",
                self.resumed_step, self.directory, state.global_step,
            )  # fmt: skip

    def _warn_if_never_saving(self, args: Any) -> None:
        """Warn (once) when a snapshot directory is set but no setting ever takes a snapshot:
        HF never saves (``save_strategy="no"``) or ``on_hf_save=False``, and neither
        ``every_n_steps`` nor ``save_at_end`` is set. The run would end with nothing in the
        directory, and a later ``resume_from_checkpoint="memopt"`` would start from step 0."""
        if self._warned_never_saving or self.directory is None:
            return
        if self.every_n_steps or self.save_at_end:
            return
        hf_never = getattr(args, "save_strategy", None) == "no"
        if self.on_hf_save and not hf_never:
            return
        self._warned_never_saving = True
        why = ("save_strategy='no' (the Trainer never saves, so on_hf_save never fires)"
               if self.on_hf_save else "on_hf_save=False")  # fmt: skip
        warnings.warn(
            f"MemoptCallback: this callback will take no snapshot in {self.directory}: {why}, "
            "every_n_steps=None and save_at_end=False; pass every_n_steps=N and/or "
            "save_at_end=True to snapshot without HF's saves"
            + ("" if not self.on_hf_save else ", or let the Trainer save (save_strategy='steps')"),
            UserWarning, stacklevel=2,
        )  # fmt: skip

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._take_due(state, kw)  # (before the epoch's data order draws from the RNG)
        self._epoch_over = False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._take_due(state, kw)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.checkpointer is not None:
            self.checkpointer.fence()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        n = self.every_n_steps
        last = self.save_at_end and bool(state.max_steps) and state.global_step >= state.max_steps
        if last or (n is not None and state.global_step % n == 0):
            self._due = int(state.global_step)  # taken once HF's log/eval/save of it are done

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._epoch_over = True

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        stop = bool(control.should_training_stop)
        if self._due == state.global_step:
            self._take_due(state, kw, final=stop)
        elif self.on_hf_save:
            self.snapshot(state, kw.get("model"), kw.get("optimizer"), kw.get("lr_scheduler"),
                          final=stop)  # fmt: skip

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        logs = logs if isinstance(logs, dict) else {}
        stopping = bool(control.should_training_stop) or state.global_step >= state.max_steps
        if (self._due is not None and self._epoch_over and stopping
                and not control.should_evaluate and not control.should_save):  # fmt: skip
            # the last step's log/eval/save are done; the end-of-training summary is being
            # logged, and load_best_model_at_end may reload weights right after it
            summary = "train_loss" in logs and "total_flos" in logs
            self._take_due(state, kw, final=True, drop_last_log=summary)
        if self.log_memory:
            self._log_memory(state, logs)

    def memory_figures(self) -> dict[str, float]:
        """The ``mem/*`` figures now (``_memory.memory_by_tier``), with this callback's arena."""
        return memory_by_tier([] if self.checkpointer is None else [self.checkpointer.arena])

    def _log_memory(self, state: Any, logs: dict[str, Any]) -> None:
        mem = {k: v for k, v in logs.items() if k.startswith("mem/")}  # MemoptTrainer.log's
        if not mem:
            mem = self.memory_figures()
            # Trainer.log appended this log's entry to log_history before on_log: add the
            # figures there (not to ``logs``: that dict is what evaluate()/train() return)
            entry = state.log_history[-1] if state.log_history else {}
            if entry.get("step") == state.global_step and all(
                entry.get(k) == v for k, v in logs.items()
            ):
                entry.update(mem)
        self.memory_history.append({"step": float(state.global_step), **mem})
        log.info("memopt: step %d memory: %s", state.global_step, format_memory(mem))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._due is not None:  # (no end-of-training log reached us: take it late, say so)
            log.warning("memopt: snapshot of step %d taken at on_train_end, after the "
                        "Trainer's end-of-training actions", self._due)  # fmt: skip
            self._take_due(state, kw, final=True)
        if self.checkpointer is not None:
            self.checkpointer.wait()
            log.info(
                "memopt: snapshots published, newest step %s in %s",
                self.checkpointer.latest(), self.checkpointer.directory,
            )  # fmt: skip

    def close(self) -> None:
        """Finish pending saves, release the checkpointer, remove the activation policies:
        both, even when the checkpointer's close raises (a failed save), then that error."""
        ckpt, acts = self.checkpointer, self.activations

        def remove_activations() -> None:
            if acts is not None:
                acts.remove()
                self.activations = None

        close_all([None if ckpt is None else ckpt.close, remove_activations])


def trainer_state_json(extra: dict[str, Any]) -> dict[str, Any]:
    """The ``TrainerState`` a ``MemoptCallback`` snapshot carries, as a dict."""
    raw = extra.get("trainer_state")
    if not isinstance(raw, str):
        raise ValueError(
            "memopt snapshot has no 'trainer_state' extra: it was not taken by MemoptCallback; "
            "load it with memopt.checkpoint.AsyncCheckpointer.load instead"
        )
    out: dict[str, Any] = json.loads(raw)
    return out


__all__ = ["MemoptCallback", "trainer_state_json", "unwrap_model", "unwrap_optimizer"]
