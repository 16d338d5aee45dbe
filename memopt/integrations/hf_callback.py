"""``MemoptCallback``: memopt's async snapshots and per-tier memory logs inside HF ``Trainer``.

Snapshots: ``on_save`` (whenever the Trainer saves, by ``save_strategy``/``save_steps``) and/or
every ``every_n_steps`` optimizer steps (``on_step_end``; then ``save_strategy="no"`` skips
HF's own synchronous checkpoint entirely), and with ``save_at_end`` at the last step. Each
snapshot holds the unwrapped model, the real optimizer (under accelerate's
``AcceleratedOptimizer``), the LR scheduler, the RNG states and the ``TrainerState`` as JSON
(``extra["trainer_state"]``), which ``resume`` turns back into a Trainer resume. ``save`` only
captures references; the copy to host runs while the next forward/backward do, and is fenced
before the next optimizer step by two hooks:

- the checkpointer's own step pre-hook, registered on the optimizer it was given (the inner
  one, whose ``step`` the wrapper calls, so it fires on every real step);
- ``on_pre_optimizer_step`` calls ``fence()`` too, which also covers gradient clipping and any
  callback that runs between HF's clip and ``optimizer.step()``.

``on_train_end`` waits until the last snapshot is published (raising a background failure).
``on_log`` logs host RSS, CUDA allocated (when CUDA is in use) and the checkpointer's and
offload tiers' arena bytes, and records them in ``memory_history``.

``activation_budget`` (bytes, ``"6GiB"``, ``"50%"``): in ``on_train_begin`` the activation
planner profiles the model on the first training samples and installs its per-block plan
(``_activations.apply_budget``); ``close()`` removes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from torch import nn
from transformers import TrainerCallback

from memopt._utils import get_logger
from memopt.checkpoint import AsyncCheckpointer
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
    even when the Trainer does not save (``save_strategy="no"``). ``checkpoint_options``:
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
        self.saved_steps: list[int] = []
        self.resumed_step: int | None = None  # set by ``resume``

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

    def snapshot(self, state: Any, model: Any, optimizer: Any, scheduler: Any) -> None:
        """Take one snapshot at ``state.global_step`` (skipped if that step is already saved)."""
        ckpt = self.ensure_checkpointer()
        step = int(state.global_step)
        if ckpt is None or step in self.saved_steps:
            return
        ckpt.save(
            step,
            model=unwrap_model(model),
            optimizer=None if optimizer is None else unwrap_optimizer(optimizer),
            scheduler=scheduler,
            extra={"trainer_state": json.dumps(dataclasses.asdict(state), sort_keys=True)},
        )
        self.saved_steps.append(step)
        if state.max_steps and step >= state.max_steps:
            # no next optimizer step will fence it, and the Trainer may change the weights in
            # place at the end (load_best_model_at_end): finish the host copy now
            ckpt.fence()
        log.info("memopt: snapshot of step %d started in %s", step, ckpt.directory)

    # -- events ---------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ensure_checkpointer()
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

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.checkpointer is not None:
            self.checkpointer.fence()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        n = self.every_n_steps
        last = self.save_at_end and bool(state.max_steps) and state.global_step >= state.max_steps
        if last or (n is not None and state.global_step % n == 0):
            self.snapshot(state, kw.get("model"), kw.get("optimizer"), kw.get("lr_scheduler"))

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.on_hf_save:
            self.snapshot(state, kw.get("model"), kw.get("optimizer"), kw.get("lr_scheduler"))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if not self.log_memory:
            return
        arenas = [] if self.checkpointer is None else [self.checkpointer.arena]
        mem = memory_by_tier(arenas)
        self.memory_history.append({"step": float(state.global_step), **mem})
        if isinstance(logs, dict):
            logs.update(mem)
        log.info("memopt: step %d memory: %s", state.global_step, format_memory(mem))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()
            log.info(
                "memopt: snapshots published, newest step %s in %s",
                self.checkpointer.latest(), self.checkpointer.directory,
            )  # fmt: skip

    def close(self) -> None:
        """Finish pending saves, release the checkpointer, remove the activation policies."""
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.activations is not None:
            self.activations.remove()
            self.activations = None


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
