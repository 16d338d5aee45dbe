"""Finding and loading a snapshot: the published one on disk, or one rebuilt from peers.

``open_published(directory, step, verify)``: ``step=None`` opens the newest published snapshot
whose files verify, warning and falling back to the previous one for each damaged snapshot;
a given step must be published and intact (``CorruptSnapshotError`` otherwise).
``restore_all`` loads any ``Snapshot`` (files, or ``mirror.MemorySnapshot``) into the model,
optimizer, scheduler and this rank's RNG, and returns the extras: one code path for both, so a
snapshot rebuilt from peers loads bit for bit as its files would. A load that refuses does so
before it changes anything.

Under a process group (the checkpointer's own gloo group, several ranks) the ranks decide
together (``agreement``): ``open_agreed`` opens the same step on every rank (the newest one
intact on all of them; a step one rank cannot open is refused on all), and ``restore_all``
raises on every rank, with nothing loaded on any, when one rank refuses (its checks, then its
optimizer's own load: ``rollback``). Without a group nothing of this runs: no collective.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memopt._utils import get_logger
from memopt.checkpoint import publish as P
from memopt.checkpoint import restore as R
from memopt.checkpoint.agreement import agree
from memopt.checkpoint.derived import fill_masters
from memopt.checkpoint.errors import CorruptSnapshotError
from memopt.checkpoint.reader import Snapshot
from memopt.checkpoint.rollback import load_optimizer

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
    snap = _newest_intact(directory, verify, None)
    if snap is None:
        raise _none_loadable(directory)
    return snap


def open_agreed(directory: str, step: int | None, verify: bool, group: Any) -> Snapshot:
    """``open_published`` on every rank of ``group`` (the checkpointer's; None: this process
    alone), the same step everywhere: a step that one rank cannot open (a damaged copy of a
    file, a read error) makes every rank raise; the newest step (``step=None``) is the newest
    one intact on every rank (a rank whose own newest is damaged falls back, and the others
    with it, with a warning)."""
    if group is None:
        return open_published(directory, step, verify)
    where = f"AsyncCheckpointer.load from {directory}"
    snap, error = None, None
    if step is not None:
        try:
            snap = open_published(directory, step, verify)
        except BaseException as e:
            error = e
        agree(group, error, f"{where} (step {step})", "no rank loaded anything")
        assert snap is not None
        return snap
    below = None
    while True:  # (ends: each round, a rank that is ahead moves back to an older step)
        if snap is None:
            try:
                snap = _newest_intact(directory, verify, below)
            except BaseException as e:
                error = e
        agree(group, error, where, "no rank loaded anything")
        steps = _steps_of(group, -1 if snap is None else snap.step)
        if min(steps) < 0:  # some rank has none: all raise
            error = _none_loadable(directory) if snap is None else None
            agree(group, error, where, "no rank loaded anything")
        if snap is None or snap.step == min(steps) == max(steps):
            assert snap is not None
            return snap
        below = min(steps)
        if snap.step > below:
            behind = [r for r, s in enumerate(steps) if s == below]
            warnings.warn(
                f"checkpoint: step {snap.step} in {directory} is intact on this rank but not on "
                f"rank(s) {behind}, whose newest intact snapshot is step {below}; every rank "
                f"loads step {below} or older",
                stacklevel=3,
            )
            snap = None


def _steps_of(group: Any, mine: int) -> list[int]:
    """Each rank's ``mine`` (one all-reduce of a vector with a slot per rank)."""
    steps = torch.zeros(dist.get_world_size(group), dtype=torch.int64)
    steps[dist.get_rank(group)] = mine
    dist.all_reduce(steps, group=group)
    return [int(s) for s in steps.tolist()]


def _none_loadable(directory: str) -> FileNotFoundError:
    foreign = P.foreign_names(directory)
    return FileNotFoundError(
        f"AsyncCheckpointer.load: no loadable snapshot in {directory}"
        + (f"; {P.foreign_message(directory, foreign)}" if foreign else "")
    )


def _newest_intact(directory: str, verify: bool, below: int | None) -> Snapshot | None:
    """The newest intact published snapshot of a step ``<= below`` (None: any), or None."""
    for _ in range(P.RELISTS):
        snap = _newest(directory, verify, below)
        if snap is not _VANISHED:
            return snap
    raise FileNotFoundError(
        f"AsyncCheckpointer.load: the snapshots in {directory} kept vanishing while being "
        f"read ({P.RELISTS} listings): is a run with a small keep= saving there right now? "
        "Load a given step, or copy a snapshot elsewhere first"
    )


_VANISHED: Any = object()


def _newest(directory: str, verify: bool, below: int | None) -> Snapshot | None:
    """The newest intact published snapshot (of a step ``<= below``, unless None; warning for
    each damaged one), None when there is none, or ``_VANISHED`` when the one being read was
    rotated out or replaced meanwhile: rotation removes a snapshot only after a newer one is
    published, so the caller lists again instead of falling back to an older one (or to none)."""
    for s in reversed(P.published_steps(directory)):
        if below is not None and s > below:
            continue
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
            warnings.warn(f"{e}; falling back to an older snapshot", stacklevel=5)
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
    group: Any = None,
) -> dict[str, Any]:
    """Load ``snap`` into what is given; on a refusal nothing has changed, on any rank.

    Everything is read and checked first (the optimizer's state dict, the model's names,
    shapes and stored rows, the scheduler's and RNG's parts, the extras). With ``group``
    (the checkpointer's, when it spans several ranks) the ranks then ``agree``: one refusing
    rank makes every rank raise before any changes. Then the optimizer's own
    ``load_state_dict`` runs before anything else changes, since it may still refuse (its
    dtype, group and foreign-state checks, torch's group sizes); memopt's optimizers and
    torch's refuse before they change their state, and with a group the ranks agree on it
    too, a rank that had loaded putting its state back (``rollback``). Only then are the
    weights copied, the scheduler loaded and the RNG set. No optimizer reads its parameters'
    values on load but ``OffloadedAdamW`` (a missing master), which ``derived.fill_masters``
    serves from the snapshot."""
    what = f"AsyncCheckpointer.load of step {snap.step} from {snap.path}"
    # Stage-3 parameter shards on NVMe (``FSDPOptimizer.resident_params``): restore writes into
    # the model's state_dict tensors, which alias the live shards only while they are resident;
    # on exit the restored shards are written back to the tier.
    resident = getattr(optimizer, "resident_params", None)
    with resident() if callable(resident) else contextlib.nullcontext():
        error: BaseException | None = None
        try:
            sd, plan, sched, rng_state, extra = _read(snap, model, optimizer, scheduler, rank,
                                                      world, rng)  # fmt: skip
        except BaseException as e:
            error = e
        agree(group, error, what, "nothing was loaded on any rank")
        if optimizer is not None and sd is not None:
            load_optimizer(optimizer, sd, model, group, what)  # the last refusal
        R.copy_model(snap, plan)
    if scheduler is not None:
        scheduler.load_state_dict(sched)
    if rng:
        R.set_rng(rng_state)
    log.info("checkpoint: loaded step %d from %s", snap.step, snap.path)
    return extra


def _read(
    snap: Snapshot, model: Any, optimizer: Any, scheduler: Any, rank: int, world: int, rng: bool
) -> tuple[Any, R.ModelPlan, Any, Any, dict[str, Any]]:
    """Every part of ``snap`` that ``restore_all`` loads, read and checked; nothing changes."""
    sd = None
    if optimizer is not None:
        sd = R.optimizer_state_dict(snap, optimizer, model, rank, world)
    plan = R.check_model(snap, model) if model is not None else []
    sched = R.scheduler_state(snap, rank) if scheduler is not None else None
    rng_state = R.rng_state(snap, rank) if rng else None
    extra = R.restore_extra(snap, rank)
    if sd is not None:
        fill_masters(snap, optimizer, model, sd, {key for _, key, _ in plan}, rank, world)
    return sd, plan, sched, rng_state, extra
