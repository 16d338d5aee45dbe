"""Finding and loading a snapshot: the published one on disk, or one rebuilt from peers.

``open_published(directory, step, verify)``: ``step=None`` opens the newest published snapshot
whose files verify, warning and falling back to the previous one for each damaged snapshot;
a given step must be published and intact (``CorruptSnapshotError`` otherwise).
``restore_all`` loads any ``Snapshot`` (files, or ``mirror.MemorySnapshot``) into the model,
optimizer, scheduler and this rank's RNG, and returns the extras: one code path for both, so a
snapshot rebuilt from peers loads bit for bit as its files would. A load that refuses does so
before it changes anything.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
from torch import nn

from memopt._utils import get_logger
from memopt.checkpoint import publish as P
from memopt.checkpoint import restore as R
from memopt.checkpoint.derived import fill_masters
from memopt.checkpoint.errors import CorruptSnapshotError
from memopt.checkpoint.reader import Snapshot

log = get_logger("memopt.checkpoint")


def open_published(directory: str, step: int | None, verify: bool) -> Snapshot:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"AsyncCheckpointer.load: step must be an int or None (the newest), got "
                        f"{step!r}")  # fmt: skip
    if step is not None:
        path = P.step_dir(directory, step)
        if not os.path.isfile(os.path.join(path, P.MANIFEST)):
            foreign = P.foreign_names(directory)
            raise FileNotFoundError(
                f"AsyncCheckpointer.load: no published snapshot of step {step} in "
                f"{directory} (published: {P.published_steps(directory)})"
                + (f"; {P.foreign_message(directory, foreign)}" if foreign else "")
            )
        return Snapshot(path, verify)
    for _ in range(P.RELISTS):
        snap = _newest(directory, verify)
        if snap is not _VANISHED:
            if snap is None:
                break
            return snap
    else:
        raise FileNotFoundError(
            f"AsyncCheckpointer.load: the snapshots in {directory} kept vanishing while being "
            f"read ({P.RELISTS} listings): is a run with a small keep= saving there right now? "
            "Load a given step, or copy a snapshot elsewhere first"
        )
    foreign = P.foreign_names(directory)
    raise FileNotFoundError(f"AsyncCheckpointer.load: no loadable snapshot in {directory}"
                            + (f"; {P.foreign_message(directory, foreign)}" if foreign else ""))


_VANISHED: Any = object()


def _newest(directory: str, verify: bool) -> Snapshot | None:
    """The newest intact published snapshot (warning for each damaged one), None when there
    is none, or ``_VANISHED`` when the one being read was rotated out or replaced meanwhile:
    rotation removes a snapshot only after a newer one is published, so the caller lists
    again instead of falling back to an older one (or to none)."""
    for s in reversed(P.published_steps(directory)):
        path = P.step_dir(directory, s)
        before = _identity(path)
        try:
            return Snapshot(path, verify)
        except (CorruptSnapshotError, FileNotFoundError) as e:
            if before is None or _identity(path) != before:
                log.info("checkpoint: step %d vanished while read (%s); listing again", s, e)
                return _VANISHED
            if isinstance(e, FileNotFoundError):
                raise
            warnings.warn(f"{e}; falling back to an older snapshot", stacklevel=4)
            log.warning("checkpoint: %s", e)
    return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def restore_all(
    snap: Snapshot,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    rank: int,
    world: int,
    rng: bool,
) -> dict[str, Any]:
    """Load ``snap`` into what is given; on a refusal nothing has changed.

    Everything is read and checked first (the optimizer's state dict, the model's names,
    shapes and stored rows, the scheduler's and RNG's parts, the extras). Then the optimizer's
    own ``load_state_dict`` runs before anything else changes, since it may still refuse
    (its dtype, group and foreign-state checks, torch's group sizes); memopt's optimizers and
    torch's refuse before they change their state. Only then are the weights copied, the
    scheduler loaded and the RNG set. No optimizer reads its parameters' values on load but
    ``OffloadedAdamW`` (a missing master), which ``derived.fill_masters`` serves from the
    snapshot."""
    # Stage-3 parameter shards on NVMe (``FSDPOptimizer.resident_params``): restore writes into
    # the model's state_dict tensors, which alias the live shards only while they are resident;
    # on exit the restored shards are written back to the tier.
    resident = getattr(optimizer, "resident_params", None)
    with resident() if callable(resident) else contextlib.nullcontext():
        sd = None
        if optimizer is not None:
            sd = R.optimizer_state_dict(snap, optimizer, model, rank, world)
        plan = R.check_model(snap, model) if model is not None else []
        sched = R.scheduler_state(snap, rank) if scheduler is not None else None
        rng_state = R.rng_state(snap, rank) if rng else None
        extra = R.restore_extra(snap, rank)
        if optimizer is not None and sd is not None:
            fill_masters(snap, optimizer, model, sd, {key for _, key, _ in plan}, rank, world)
            optimizer.load_state_dict(sd)  # the last refusal; nothing has changed before it
        R.copy_model(snap, plan)
    if scheduler is not None:
        scheduler.load_state_dict(sched)
    if rng:
        R.set_rng(rng_state)
    log.info("checkpoint: loaded step %d from %s", snap.step, snap.path)
    return extra
