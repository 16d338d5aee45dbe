"""``AsyncCheckpointer``: lazy multi-level snapshots (device -> host -> disk), crash-consistent.

``save(step, ...)`` captures *references* to the model's and optimizer's tensors (parameters
and optimizer state do not change during forward and backward; buffers, which a forward may
change, and small scheduler/extra/param_group tensors are copied in ``save``: ``capture``)
and returns; the copier thread
copies them to host staging (``pipeline``) while the next forward/backward run, and the
writer thread writes and publishes them. A step pre-hook on the optimizer (``fence``) blocks
only if that copy is still running when the next ``optimizer.step()`` is about to change the
values: that wait, plus the capture, is the save's *stall* (``stats``). Code that changes
parameters in place outside ``optimizer.step()`` must call ``fence()`` first.

Publication (``_publish``, in the writer thread): every rank writes and fsyncs its files into
``.tmp-step_.../``, holding its lock file (``tmpdirs``: cleanup never removes a live save's
directory); the ranks exchange their checksums and sizes (``all_gather_object`` on a gloo group
of the checkpointer's own, so it never interleaves with training collectives); rank 0 checks
that every rank's files are there, writes the manifest, fsyncs, renames the directory to
``step_.../`` and rotates old snapshots; a broadcast tells every rank the outcome
(``commit.settle``). Loading verifies checksums and falls
back to the previous published snapshot when the newest is damaged. A failed save is raised
once, by ``wait()``/``close()`` or by the next ``save``, which then does not save its own step
(``failures``); saves still unpublished when the interpreter exits are finished by ``exit_hook``.
A Ctrl-C in ``save`` hands the save to the pipeline whole or not at all (``_hand_over``); a
forked child cannot use the checkpointer, and its exit leaves it alone (``forked``). Its
threads hold no reference to it: one dropped without ``close()`` finishes its saves in flight,
then is garbage-collected and its threads, memory and group released (``lifetime``).

With ``redundancy=RedundancyConfig(...)`` each save's staged bytes are also mirrored in host
memory and protected on peers by a background thread on a second gloo group (``peer_tier``);
``recover()`` / ``load(from_peers=True)`` rebuild a lost rank's snapshot from them.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memopt.checkpoint import capture as C
from memopt.checkpoint import exit_hook, forked
from memopt.checkpoint import failures as F
from memopt.checkpoint import lifetime as L
from memopt.checkpoint import publish as P
from memopt.checkpoint import tmpdirs as T
from memopt.checkpoint.commit import LostContact, check_metadata, commit, settle
from memopt.checkpoint.config import CheckpointConfig
from memopt.checkpoint.errors import CheckpointError, PeerRecoveryError
from memopt.checkpoint.fileformat import checksum_fn, resolve_checksum, write_file
from memopt.checkpoint.groups import own_group, release
from memopt.checkpoint.loading import open_agreed, restore_all
from memopt.checkpoint.peer_tier import build_tier, check_tier
from memopt.checkpoint.pipeline import Job, Slots, new_job
from memopt.checkpoint.reader import Snapshot
from memopt.checkpoint.redundancy_config import RedundancyConfig
from memopt.checkpoint.stats import CheckpointStats
from memopt.checkpoint.writer import Engines
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.sigdefer import deferred_sigint


class AsyncCheckpointer:
    """Asynchronous, crash-consistent, reshardable snapshots in ``directory``.

    Construct it on every rank of ``process_group`` (None: the default group; a subgroup's
    ranks alone; it makes a gloo group of its own: ``groups``). Options: ``CheckpointConfig``
    fields as keywords, or ``config=``; ``metadata=`` a dict. ``redundancy=RedundancyConfig``:
    also keep each save in peers' host memory (REFT), on ``redundancy_group`` (default: a new
    gloo group over the same ranks); ``adopt=`` an older checkpointer of this process (e.g.
    before the process group was re-formed with a replacement rank) whose in-memory snapshot
    this one takes over (the old one is closed).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int | None = None,  # (None: 3, CheckpointConfig's default)
        *,
        config: CheckpointConfig | None = None,
        metadata: Mapping[str, Any] | None = None,
        process_group: Any = None,
        redundancy: RedundancyConfig | None = None,
        redundancy_group: Any = None,
        adopt: AsyncCheckpointer | None = None,
        **options: Any,
    ) -> None:
        if config is not None and (options or keep is not None):
            raise TypeError(
                "AsyncCheckpointer: pass either config=CheckpointConfig(...) or keyword options "
                f"(keep, {', '.join(options) or '...'}), not both"
            )
        self.config = config or CheckpointConfig(keep=3 if keep is None else keep, **options)
        if not os.fspath(directory):  # "" would write step_* into (and rotate out of) the cwd
            raise ValueError("AsyncCheckpointer: the checkpoint directory is empty; pass a path "
                             "(e.g. 'checkpoints')")  # fmt: skip
        self.directory = os.path.abspath(os.fspath(directory))
        self.metadata = check_metadata(metadata or {})  # (JSON: it goes into each manifest)
        self.checksum = resolve_checksum(self.config.checksum)
        check_tier(redundancy, redundancy_group, adopt, process_group)  # (before collectives)
        self.rank, self.world, self._group = own_group(process_group)
        try:
            self._check_directory()
            self.peers = build_tier(redundancy, redundancy_group, adopt, self._group, self.config)
        except BaseException:
            release(self._group)
            raise
        pin: Any = "auto" if self.config.pin == "auto" and torch.cuda.is_available() else "off"
        self.arena = PinnedArena(ArenaConfig(chunk_bytes=0, alignment=64, pin=pin))
        self.stats = CheckpointStats()
        self._jobs: list[Job] = []  # handed to the pipeline, until collected once done
        self._slots = Slots(self.config.max_inflight)
        self._seq = 0
        self._hooks: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._cleaned = False  # rank 0: crash leftovers removed (by the first save's writer)
        self._warned_later = False  # the directory holds steps later than a save: warned once
        self._engines = Engines(at_exit=True)  # the writer's I/O engines, kept across saves
        # threads that hold no reference to self, and a finalizer: ``lifetime``
        self._owned, self._finalizer = L.start(
            self, nice=self.config.background_nice,
            fuse_checksum=self.config.checksum_in_copy and self.checksum == "crc32c",
        )  # fmt: skip
        self._pipeline = self._owned.pipeline
        self._closed = False
        self._pid = os.getpid()  # its threads and group exist only in this process (``forked``)
        exit_hook.track(self)  # unpublished saves are finished at exit (weakly referenced)

    def _check_directory(self) -> None:
        P.check_directory(self.directory)  # (crash leftovers: removed by the first save)
        # this run's mark in its temporary directories' names, the same on every rank: a
        # crashed run's leftovers (or another run's save in flight) never share one
        box = [uuid.uuid4().hex[:8]]
        if self._group is not None:
            dist.broadcast_object_list(box, group=self._group, group_src=0)
        self._run = box[0]

    # -- save ---------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Snapshot the given objects at ``step``; returns once references are captured
        (and buffers and small tensors copied). Raises a failed earlier save instead of
        saving (``failures``): step ``step`` is then not saved."""
        forked.refuse(self._pid, "AsyncCheckpointer.save", self.directory)
        if self._closed:
            raise RuntimeError("AsyncCheckpointer.save after close()")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"AsyncCheckpointer.save: step must be an int >= 0, got {step!r} "
                f"({type(step).__name__})"
            )
        t0 = time.perf_counter()
        pending = self._pending(in_save=True)
        if pending is not None:
            err = CheckpointError(F.not_saved(step, pending[0]))
            if self._group is not None:  # the other ranks' writers pair this save: skip it
                self._submit_failed(step, err, t0, F.SKIPPED)
            raise err from pending[1]
        seq = self._seq  # (advanced by the hand-over alone)
        try:
            self._slots.wait(self._jobs)
            entries, skel = C.capture_all(
                model, optimizer, scheduler, extra, self.rank, self.world, self.config.save_rng
            )
            self._fence_on(optimizer)
            job = new_job(step, self._seq, entries, skel, t0, self.config.alignment)
            job.record.capture_s = job.record.stall_s = time.perf_counter() - t0
            self._hand_over(job, record=True)
        except BaseException as e:  # not handed over: the other ranks wait for it, fail it
            if self._group is not None and self._seq == seq:
                self._submit_failed(step, e, t0)
            raise

    def _fence_on(self, optimizer: Any) -> None:
        """The fence pre-hook on ``optimizer``, once (by identity: a reused id would leave a
        new optimizer without one), tracked as it is registered (``close()`` removes it)."""
        if optimizer is not None and optimizer not in self._hooks:
            with deferred_sigint():
                self._hooks[optimizer] = optimizer.register_step_pre_hook(L.weak_fence(self))

    def _hand_over(self, job: Job, record: bool = False) -> None:
        """Give ``job`` to the pipeline whole, a Ctrl-C held back (one between the append and
        the submit left fence(), wait() and close() waiting forever for a job no thread had)."""
        with deferred_sigint():
            if record:
                self.stats.records.append(job.record)
            self._seq += 1
            self._jobs.append(job)
            job.owner = self  # (keeps self alive until the job is done: ``lifetime``)
            self._pipeline.submit(job)

    def _submit_failed(self, step: int, err: BaseException, t0: float, skipped: str = "") -> None:
        """A save that failed in ``save()`` (already raised there) still goes to the writer,
        which takes part in the collective publication (it fails on every rank). It stages
        nothing: no slot."""
        with deferred_sigint():
            failed = new_job(step, self._seq, [], {}, t0, self.config.alignment)
            failed.error, failed.reported, failed.skipped = err, True, skipped
            self._hand_over(failed)

    # -- fence ----------------------------------------------------------------------------
    def fence(self) -> None:
        """Block until every save's copy to host has finished (values may change after). In a
        forked child, nothing: its tensors are its own copies, which no save reads."""
        if os.getpid() != self._pid:
            return
        for job in self._jobs:
            if not job.copied.is_set():
                t = time.perf_counter()
                job.copied.wait()
                job.record.stall_s += time.perf_counter() - t

    # -- background stage 2 -------------------------------------------------------------
    def _tmp(self, job: Job) -> str:
        return P.tmp_dir(self.directory, job.step, job.seq, self._run)

    def _write(self, job: Job) -> None:
        tmp = self._tmp(job)
        data_name, json_name = P.rank_files(self.rank)
        if self.peers is not None:  # a host copy for peers, overlapping the disk write
            self.peers.begin(job, self.rank, self.world)
        try:
            if self.rank == 0 and not self._cleaned:  # (a checkpointer that only reads
                self._cleaned = True  # never cleans: ``tmpdirs``)
                T.clean_stale(self.directory)
            job.claim = T.claim(tmp)  # held until the save is settled (``_publish``)
            assert job.staging is not None
            data_crc = write_file(os.path.join(tmp, data_name), job.plan, job.staging,
                                  self.checksum, self.config.fsync, self.config.direct_io,
                                  job.wait_copied, self._engines, job.copied_checksum)  # fmt: skip
            raw = P.write_json(os.path.join(tmp, json_name), job.skeleton, self.config.fsync)
            job.sizes = T.written(job.claim, (data_name, json_name), job.step, self.rank)
        except OSError as e:
            raise CheckpointError(
                f"checkpoint step {job.step}: writing rank {self.rank}'s files in {tmp} failed: "
                f"{e} (disk full or not writable?); published snapshots are untouched"
            ) from e
        finally:
            if self.peers is not None:  # before the staging block is released
                self.peers.end(job)
        job.files = {
            data_name: data_crc,
            json_name: checksum_fn(self.checksum)(raw, 0),
        }

    def _publish(self, job: Job) -> None:
        if self.peers is not None:  # every job, failed ones too: the protector is collective
            self.peers.submit(job)
        meta, lost = (self.world, self.checksum, self.metadata), False
        try:
            outcome, by_peer = settle(
                job, self.rank, self.world, self._group,
                lambda infos: commit(self.directory, self._tmp(job), job, infos, self.config,
                                     meta),
                lambda step, seq: P.tmp_dir(self.directory, step, seq, self._run),
            )  # fmt: skip
        except LostContact:
            lost = True
            raise
        finally:  # published or removed on every rank by now, unless this rank lost contact
            if lost:  # removed unless another rank still holds it
                T.abandon(self.directory, job.claim)
            else:
                T.release(job.claim)
        if outcome and job.error is None:
            job.by_peer = by_peer
            raise CheckpointError(outcome)

    # -- completion -------------------------------------------------------------------
    def _collect(self) -> tuple[list[Job], list[Job]]:
        """Take the finished saves off the list: (failures not raised yet, saves that failed
        only because other ranks skipped them)."""
        failed: list[Job] = []
        lost: list[Job] = []
        for job in [j for j in self._jobs if j.done.is_set()]:
            self._jobs.remove(job)
            self._owned.unreported.pop(job.seq, None)  # (raised or warned from here on)
            if job.later_steps and not self._warned_later:  # (rank 0's commit found them)
                self._warned_later = True
                warnings.warn(P.later_steps_message(self.directory, job), stacklevel=4)
            if job.error is not None and not job.reported:
                (lost if job.by_peer else failed).append(job)
        return failed, lost

    def _pending(self, in_save: bool) -> tuple[str, BaseException | None] | None:
        """The failure to raise now, as (message, cause), or None (``failures``)."""
        failed, lost = self._collect()
        return F.pending(failed, lost, in_save, self.rank, self.peers)

    def wait(self) -> None:
        """Block until every save so far is published (and, with redundancy, protected or
        skipped by peers); raise a background failure."""
        forked.refuse(self._pid, "AsyncCheckpointer.wait", self.directory)
        for job in list(self._jobs):
            job.done.wait()
        if self.peers is not None:
            self.peers.join()
        if (pending := self._pending(in_save=False)) is not None:
            raise F.as_error(*pending)

    def latest(self) -> int | None:
        """The newest published step (complete on every rank), or None."""
        steps = P.published_steps(self.directory)
        return steps[-1] if steps else None

    def steps(self) -> list[int]:
        return P.published_steps(self.directory)

    # -- load -----------------------------------------------------------------------------
    def load(
        self,
        step: int | None = None,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        from_peers: bool = False,
    ) -> dict[str, Any]:
        """Restore a snapshot (``None``: the newest good one) and return its ``extra``.

        ``from_peers=True`` (collective): the snapshot held in peers' memory (``recover``);
        where peers cannot rebuild it, the published one on disk, with a warning.
        """
        forked.refuse(self._pid, "AsyncCheckpointer.load", self.directory)
        self.wait()
        if from_peers:
            try:
                snap = self._from_peers(step)
            except PeerRecoveryError as e:
                try:
                    snap = open_agreed(self.directory, step, self.config.verify, self._group)
                except FileNotFoundError as d:
                    raise PeerRecoveryError(f"{e}; no fallback on disk: {d}") from e
                warnings.warn(f"{e}; loading step {snap.step} from disk instead", stacklevel=2)
        else:
            snap = open_agreed(self.directory, step, self.config.verify, self._group)
        return self._restore(snap, model, optimizer, scheduler)

    def recover(
        self,
        step: int | None = None,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> dict[str, Any]:
        """Collective: load the latest snapshot protected in peers' memory (rebuilding it on
        ranks that lost theirs), without reading the directory; returns its ``extra``.
        Raises ``PeerRecoveryError`` on every rank when peers cannot rebuild it."""
        forked.refuse(self._pid, "AsyncCheckpointer.recover", self.directory)
        self.wait()
        return self._restore(self._from_peers(step), model, optimizer, scheduler)

    def _from_peers(self, step: int | None) -> Snapshot:
        if self.peers is None:
            raise ValueError("AsyncCheckpointer: loading from peers needs "
                             "redundancy=RedundancyConfig(...)")  # fmt: skip
        return self.peers.recover(step, self.rank, self.world)

    def _restore(self, snap: Snapshot, model: Any, optimizer: Any, scheduler: Any) -> Any:
        return restore_all(snap, model, optimizer, scheduler, self.rank, self.world,
                           self.config.restore_rng, self._group)  # fmt: skip

    def close(self) -> None:
        """Finish pending saves, stop the threads, release staging memory. (A checkpointer
        dropped without it finishes its saves, then is garbage-collected: ``lifetime``.)"""
        if self._closed:
            return
        forked.refuse(self._pid, "AsyncCheckpointer.close", self.directory)
        self._closed = True
        exit_hook.untrack(self)
        self._finalizer.detach()
        try:
            for job in list(self._jobs):
                job.done.wait()
        finally:  # threads, engines, fence hooks, staging, peers' tier, gloo group
            self._owned.release()
            self._group = None
        P.wait_deletions(self.directory)  # rotated snapshots gone (no .trash-* after close)
        if (pending := self._pending(in_save=False)) is not None:
            raise F.as_error(*pending)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
