"""``memopt.setup(model, config)``: apply a whole ``Config`` to a model, in a fixed order.

1. Move the model to its device and cast it to ``model.dtype`` (``memopt.config.cast``:
   parameters and persistent buffers; non-persistent buffers such as RoPE ``inv_freq`` stay
   fp32, as under DeepSpeed's bf16 and Hugging Face's ``from_pretrained``).
2. Activations (before sharding, while the blocks are plain modules): ``policy``/``policies``
   install directly; ``budget`` profiles one step on ``sample_batch`` and runs the planner.
3. Optimizer from ``optimizer`` (param groups, low-rank targets); optimizer-in-backward
   registers its hooks here (no sharding then).
4. Sharding and offload from ``sharding`` (``memopt.sharding.apply_sharding``); at stage 0
   with more than one rank the model is wrapped in ``DistributedDataParallel``.
5. LR scheduler (warm-up + cosine over ``train.steps``) on the final optimizer.
6. Checkpointer (``checkpoint.directory``), with ``checkpoint.redundancy`` its in-memory peer
   tier (``AsyncCheckpointer(redundancy=RedundancyConfig(...))``: each save's staged bytes are
   protected on peers in the background), and, with ``checkpoint.resume``, a resume from the
   newest snapshot there: ``Setup.start_step`` and ``Setup.resume_message`` say where from.

Before step 1, ``memopt.config.preflight`` checks the world size (redundancy needs 2+ ranks and
a directory, optimizer-in-backward one rank) and creates the directories the run writes, with
errors naming the key. A resume puts the Config's optimizer values (lr, betas, eps,
weight_decay, ...) back over the snapshot's and says which changed (``memopt.config.resume``);
with ``checkpoint.resume`` off, a directory already holding snapshots is reported.

``process_group`` (the ranks that share sharding, DDP and checkpoints): None for the default
group, a group, or a 1-D ``DeviceMesh`` (its group), as ``memopt.shard`` takes; a group this
rank is not in is refused.

The returned ``Setup`` holds what a training loop needs; the loop stays the user's.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memopt._utils.process_group import as_process_group
from memopt.checkpoint.errors import CorruptSnapshotError
from memopt.config import build
from memopt.config import resume as resume_values
from memopt.config.cast import cast_model
from memopt.config.config import Config
from memopt.config.preflight import check_paths, check_world, redundancy_config

__all__ = ["Setup", "close_all", "redundancy_config", "resolve_device", "setup"]


@dataclass
class Setup:
    """What ``memopt.setup`` built. Call ``model`` and ``optimizer`` as usual; ``save(step)``
    snapshots; ``start_step`` is where a resumed run continues."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpointer: Any = None
    activations: Any = None
    plan: Any = None
    in_backward: Any = None
    redundancy: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    start_step: int = 0
    resumed_from: int | None = None
    resume_message: str = ""

    @property
    def raw_model(self) -> nn.Module:
        """The model without a DDP wrapper (what snapshots hold)."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.module
        return self.model

    def resume(self) -> int | None:
        """Load the newest snapshot of the checkpoint directory (if any); return its step."""
        ck = self.checkpointer
        if ck is None or ck.latest() is None:
            self.resume_message = ""
            return None
        wanted = resume_values.config_values(self.optimizer, self.scheduler)
        step, extra, damaged = self._load_newest_good()
        # The load restored the snapshot's lr/betas/eps/weight_decay too: the Config's win.
        changes = resume_values.reapply(self.optimizer, self.scheduler, wanted)
        if self.in_backward is not None and "in_backward" in extra:
            self.in_backward.load_state_dict(extra["in_backward"])
        self.start_step, self.resumed_from = step, step
        note = f"; {changes}" if changes else ""
        skipped = f" (skipped damaged step(s) {damaged}: see the warnings)" if damaged else ""
        self.resume_message = (f"resumed from snapshot step {step} in {ck.directory}{skipped}; "
                               f"continuing at step {step + 1}{note}")
        return int(step)

    def _load_newest_good(self) -> tuple[int, dict[str, Any], list[int]]:
        """Load the newest snapshot whose files pass their checksums, as ``load(step=None)``
        does (each rank reads every rank's files, so all ranks agree on which): (its step, its
        extra, the newer damaged steps skipped). Nothing is restored from a damaged one."""
        ck = self.checkpointer
        assert ck is not None
        damaged: list[int] = []
        for step in reversed(ck.steps()):
            try:
                extra = ck.load(step, model=self.raw_model, optimizer=self.optimizer,
                                scheduler=self.scheduler)  # fmt: skip
            except CorruptSnapshotError as e:
                warnings.warn(f"memopt.setup: resume: {e}; trying the snapshot before it",
                              stacklevel=3)  # fmt: skip
                damaged.append(step)
                continue
            return step, extra, damaged
        raise CorruptSnapshotError(
            f"memopt.setup: resume: every snapshot in {ck.directory} is damaged (steps "
            f"{damaged}, see the warnings); move them away to start from step 0, or pass "
            "resume=False (checkpoint.resume=false) with a fresh checkpoint.directory"
        )

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None = None) -> torch.Tensor | None:
        """Clip the gradients to the global 2-norm ``max_norm`` (None: the Config's
        ``optimizer.max_grad_norm``) and return their total norm before clipping, whatever the
        stage: the sharded optimizer's ``clip_grad_norm_`` (the norm over every rank's shards)
        when it has one, else ``torch.nn.utils.clip_grad_norm_`` over the model's parameters
        (stage 0, one process or DDP). Returns None and changes nothing when there is no
        limit (``max_grad_norm: null``) or under ``optimizer.in_backward``, whose hooks
        already clipped with the Config's limit while the backward ran."""
        if max_norm is None:
            max_norm = self.config.optimizer.max_grad_norm
        elif isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not (
            0 < max_norm < float("inf")
        ):
            raise ValueError(f"Setup.clip_grad_norm_: max_norm must be a positive finite number "
                             f"(or None for optimizer.max_grad_norm), got {max_norm!r}")
        if max_norm is None or self.in_backward is not None:
            return None
        clip = getattr(self.optimizer, "clip_grad_norm_", None)
        if callable(clip):  # ZeRO 1-3: the gradients are (shards) of the optimizer's own
            return clip(max_norm)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def save(self, step: int) -> None:
        """Snapshot model, optimizer and scheduler at ``step`` (asynchronous; see
        memopt.checkpoint); with redundancy, the checkpointer also protects it on peers."""
        if self.checkpointer is not None:
            extra: dict[str, Any] = {"step": step}
            if self.in_backward is not None:  # micro-batch counter and previous grad norm
                extra["in_backward"] = self.in_backward.state_dict()
            self.checkpointer.save(step, model=self.raw_model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, extra=extra)

    def close(self) -> None:
        """Finish pending snapshots, remove activation hooks, close the optimizer's tiers.
        Every one of these runs even when an earlier one raises (a failed background save
        raised by the checkpointer's close); then the first error is raised, the others
        noted on it (before, the tiers stayed open and the hooks installed)."""
        close_all([
            None if self.checkpointer is None else self.checkpointer.close,  # (first: its
            getattr(self.optimizer, "close", None),  # saves read the tiers' state)
            None if self.activations is None else self.activations.remove,
            None if self.in_backward is None else self.in_backward.remove,
        ])  # fmt: skip

    def describe(self) -> str:
        from memopt.config.describe import describe_setup

        return describe_setup(self)


def close_all(steps: list[Any]) -> None:
    """Call every callable of ``steps`` (None and non-callables skipped) whatever the others
    raise, then raise the first exception, the later ones noted on it (``add_note``)."""
    first: BaseException | None = None
    for step in steps:
        if not callable(step):
            continue
        try:
            step()
        except BaseException as e:  # noqa: BLE001 - raised below, once everything is closed
            if first is None:
                first = e
            else:
                what = getattr(step, "__qualname__", repr(step))
                note = f"while closing, {what} also raised: {e!r}"
                add_note = getattr(first, "add_note", None)  # (Python 3.11+)
                if callable(add_note):
                    add_note(note)
                else:
                    warnings.warn(note, stacklevel=3)
    if first is not None:
        raise first


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("model.device: cuda, but torch.cuda.is_available() is False")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _activations(model: nn.Module, config: Config, sample_batch: Any) -> tuple[Any, Any]:
    ac = config.activations
    if not ac.enabled:
        return None, None
    from memopt.activations import ActivationOptions, apply, plan
    from memopt.offload.nvme_file import NVMeConfig

    options = ActivationOptions(nvme=NVMeConfig(directory=ac.nvme_path)) if ac.nvme_path else None
    if ac.budget:
        if sample_batch is None:
            raise ValueError("activations.budget runs the planner, which profiles one step: pass "
                             "memopt.setup(model, config, sample_batch=...)")
        the_plan = plan(model, sample_batch, ac.budget, actions=ac.actions, tier=ac.tier)
        model.zero_grad(set_to_none=True)
        return apply(model, the_plan, options=options), the_plan
    return apply(model, build.activation_policies(model, ac), options=options), None


def _check_member(group: Any) -> None:
    """Refuse a group this rank is not in (``new_group()``'s non-member marker)."""
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(
            f"memopt.setup: this process (global rank {dist.get_rank()}) is not a member of the "
            "process_group given; call memopt.setup only on the group's ranks, with a group "
            "that contains every rank calling it (or None for the default group)"
        )


def setup(model: nn.Module, config: Config, *, sample_batch: Any = None,
          process_group: Any = None, resume: bool | None = None) -> Setup:
    """Apply ``config`` to ``model`` (see the module docstring) and return a ``Setup``."""
    if not isinstance(config, Config):
        raise TypeError(f"memopt.setup: config must be a memopt.Config, got {type(config)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"memopt.setup: model must be an nn.Module, got {type(model)}")
    distributed = dist.is_available() and dist.is_initialized()
    process_group = as_process_group(process_group, "memopt.setup")
    if process_group is not None and not distributed:
        raise ValueError("memopt.setup: a process_group was given but torch.distributed is not "
                         "initialized; call init_process_group() first")  # fmt: skip
    _check_member(process_group)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and not distributed and process_group is None:
        raise RuntimeError(
            f"memopt.setup: this process was launched as one of {launched} ranks (WORLD_SIZE), "
            "but torch.distributed is not initialized, so every rank would train alone and "
            "write the same checkpoint files; call torch.distributed.init_process_group() "
            "before memopt.setup (memopt run does it for you)"
        )
    world = dist.get_world_size(process_group) if distributed else 1
    rank = dist.get_rank(process_group) if distributed else 0
    check_world(config, world)  # (memopt run's launcher and ranks check the same rules)
    check_paths(config)  # the directories it writes, before anything is built
    device = resolve_device(config.model.device)
    cast_model(model.to(device=device), build.DTYPES[config.model.dtype])
    manager, the_plan = _activations(model, config, sample_batch)
    opt: torch.optim.Optimizer = build.build_optimizer(model, config.optimizer)
    hooks = None
    if config.optimizer.in_backward:  # (one rank only: check_world)
        from memopt.optim import step_in_backward

        hooks = step_in_backward(model, opt, accumulation_steps=config.train.grad_accum,  # type: ignore[arg-type]
                                 max_grad_norm=config.optimizer.max_grad_norm)
    sc = build.shard_config(config.sharding)
    if sc is not None:
        from memopt.sharding import apply_sharding

        model, opt = apply_sharding(model, opt, sc, process_group)
    elif world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                    process_group=process_group)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build.lr_lambda(config.optimizer,
                                                                   config.train.steps))
    out = Setup(config, model, opt, sched, activations=manager, plan=the_plan, in_backward=hooks,
                device=device, rank=rank, world_size=world)
    out.checkpointer, out.redundancy = _checkpointing(config, process_group, world)
    if config.checkpoint.resume if resume is None else resume:
        out.resume()
    elif out.checkpointer is not None:  # an earlier run's snapshots: say so before step 1
        why = "checkpoint.resume=false" if resume is None else "memopt.setup(resume=False)"
        out.resume_message = resume_values.fresh_start_note(out.checkpointer, why)
        if out.resume_message and rank == 0:
            warnings.warn(f"memopt.setup: resume {out.resume_message}", stacklevel=2)
    return out


def _checkpointing(config: Config, process_group: Any, world: int) -> tuple[Any, Any]:
    """The checkpointer, and its in-memory peer tier (``Setup.redundancy``) when configured."""
    ck = config.checkpoint
    if not ck.directory:
        return None, None
    from memopt.checkpoint import AsyncCheckpointer

    checkpointer = AsyncCheckpointer(ck.directory, keep=ck.keep, fsync=ck.fsync,
                                     process_group=process_group,
                                     redundancy=redundancy_config(ck, world))
    return checkpointer, checkpointer.peers
