"""``AsyncCheckpointer``: lazy multi-level snapshots (device -> host -> disk), crash-consistent.

``save(step, ...)`` captures *references* to the model's and optimizer's tensors (parameters
and optimizer state do not change during forward and backward) and returns; the copier thread
copies them to host staging (``pipeline``) while the next forward/backward run, and the
writer thread writes and publishes them. A step pre-hook on the optimizer (``fence``) blocks
only if that copy is still running when the next ``optimizer.step()`` is about to change the
values: that wait, plus the capture, is the save's *stall* (``stats``). Code that changes
parameters in place outside ``optimizer.step()`` must call ``fence()`` first.

Publication (``_publish``, in the writer thread): every rank writes and fsyncs its files into
``.tmp-step_.../``; the ranks exchange their checksums (``all_gather_object`` on a gloo group
of the checkpointer's own, so it never interleaves with training collectives); rank 0 writes
the manifest, fsyncs, renames the directory to ``step_.../`` and rotates old snapshots; a
broadcast tells every rank the outcome. Loading verifies checksums and falls back to the
previous published snapshot when the newest is damaged.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memopt._utils import get_logger
from memopt.checkpoint import capture as C
from memopt.checkpoint import publish as P
from memopt.checkpoint import restore as R
from memopt.checkpoint.config import CheckpointConfig
from memopt.checkpoint.errors import CheckpointError, CorruptSnapshotError
from memopt.checkpoint.fileformat import checksum_fn, plan_file, resolve_checksum, write_file
from memopt.checkpoint.pipeline import Job, Pipeline
from memopt.checkpoint.reader import Snapshot
from memopt.checkpoint.stats import CheckpointStats, SaveRecord
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.hostmem import PAGE_SIZE

FORMAT_VERSION = 1
log = get_logger("memopt.checkpoint")


class AsyncCheckpointer:
    """Asynchronous, crash-consistent, reshardable snapshots in ``directory``.

    Construct it on every rank (it makes a gloo group when a process group exists).
    Options: ``CheckpointConfig`` fields as keywords, or ``config=``; ``metadata=`` a dict.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int = 3,
        *,
        config: CheckpointConfig | None = None,
        metadata: Mapping[str, Any] | None = None,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        if config is not None and (options or keep != 3):
            raise TypeError(
                "AsyncCheckpointer: pass either config=CheckpointConfig(...) or keyword options "
                f"(keep, {', '.join(options) or '...'}), not both"
            )
        self.config = config or CheckpointConfig(keep=keep, **options)
        self.directory = os.path.abspath(os.fspath(directory))
        self.metadata = dict(metadata or {})
        self.checksum = resolve_checksum(self.config.checksum)
        self._dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self._dist else 0
        self.world = dist.get_world_size(process_group) if self._dist else 1
        self._group = None
        if self._dist and self.world > 1:  # our own gloo group: never mixed with training's
            ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
            self._group = dist.new_group(ranks=ranks, backend="gloo")
        self._check_directory()
        pin: Any = "auto" if self.config.pin == "auto" and torch.cuda.is_available() else "off"
        self.arena = PinnedArena(ArenaConfig(chunk_bytes=0, alignment=64, pin=pin))
        self.stats = CheckpointStats()
        self._jobs: list[Job] = []
        self._slots = threading.Semaphore(self.config.max_inflight)
        self._seq = 0
        self._hooks: dict[int, Any] = {}
        self._error: BaseException | None = None
        self._pipeline = Pipeline(self.arena, self._write, self._publish, self._slots.release)
        self._closed = False

    def _check_directory(self) -> None:
        where = self.directory
        try:
            os.makedirs(where, exist_ok=True)
        except OSError as e:
            raise PermissionError(
                f"AsyncCheckpointer: cannot create the checkpoint directory {where}: {e}"
            ) from e
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(
                f"AsyncCheckpointer: the checkpoint directory {where} is not writable by this "
                "process; pass a directory you can write to"
            )
        if self.rank == 0:
            P.clean_stale(where)
        self._barrier()

    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

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
        """Snapshot the given objects at ``step``; returns once references are captured."""
        if self._closed:
            raise RuntimeError("AsyncCheckpointer.save after close()")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"AsyncCheckpointer.save: step must be an int >= 0, got {step!r}")
        self._raise_pending()
        t0 = time.perf_counter()
        self._slots.acquire()
        try:
            entries, skel = self._capture(model, optimizer, scheduler, extra)
            job = self._job(step, entries, skel, t0)
        except BaseException as e:
            if self._group is None:
                self._slots.release()
            else:  # the other ranks' writers wait for this rank: fail this save on all of them
                failed = self._job(step, [], {}, t0)
                failed.error, failed.reported = e, True
                self._jobs.append(failed)
                self._pipeline.submit(failed)
            raise
        if optimizer is not None and id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(lambda *_: self.fence())
        job.record.capture_s = job.record.stall_s = time.perf_counter() - t0
        self.stats.records.append(job.record)
        self._jobs.append(job)
        self._pipeline.submit(job)

    def _capture(
        self, model: Any, optimizer: Any, scheduler: Any, extra: Any
    ) -> tuple[list[C.Entry], dict[str, Any]]:
        entries: list[C.Entry] = []
        skel: dict[str, Any] = {"rank": self.rank, "world_size": self.world}
        if model is not None:
            e, skel["model"] = C.capture_model(model, self.rank)
            entries += e
        if optimizer is not None:
            e, skel["optimizer"] = C.capture_optimizer(optimizer, model, self.rank, self.world)
            entries += e
        for key, obj in (
            ("scheduler", None if scheduler is None else scheduler.state_dict()),
            ("extra", dict(extra or {})),
        ):
            e, skel[key] = C.capture_plain(obj, key)
            entries += e
        skel["rng"] = None
        if self.config.save_rng:
            e, skel["rng"] = C.capture_rng()
            entries += e
        return entries, skel

    def _job(self, step: int, entries: list[C.Entry], skel: dict[str, Any], t0: float) -> Job:
        plan = plan_file(
            [(e.name, e.tensor.dtype, e.tensor.shape) for e in entries],
            self.config.alignment,
            {"format": "pt", "memopt_format": str(FORMAT_VERSION)},
        )
        skel["tensors"] = {
            e.name: {"global_shape": list(e.global_shape), "row_offset": e.row_offset}
            for e in entries
        }
        align = min(self.config.alignment, PAGE_SIZE)
        job = Job(step, self._seq, entries, skel, plan, SaveRecord(step), t0, align)
        self._seq += 1
        if any(e.tensor.device.type == "cuda" for e in entries):
            devices = {e.tensor.device for e in entries if e.tensor.device.type == "cuda"}
            for d in devices:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(d))
                job.ready.append(ev)
        job.record.nbytes = len(plan.header) + plan.data_bytes
        return job

    # -- fence ----------------------------------------------------------------------------
    def fence(self) -> None:
        """Block until every save's copy to host has finished (values may change after)."""
        for job in self._jobs:
            if not job.copied.is_set():
                t = time.perf_counter()
                job.copied.wait()
                job.record.stall_s += time.perf_counter() - t

    # -- background stage 2 -------------------------------------------------------------
    def _tmp(self, job: Job) -> str:
        return P.tmp_dir(self.directory, job.step, job.seq)

    def _write(self, job: Job) -> None:
        tmp = self._tmp(job)
        data_name, json_name = P.rank_files(self.rank)
        try:
            os.makedirs(tmp, exist_ok=True)
            assert job.staging is not None
            data_crc = write_file(
                os.path.join(tmp, data_name),
                job.plan,
                job.staging,
                self.checksum,
                self.config.fsync,
                self.config.direct_io,
                job.wait_copied,
            )
            raw = P.write_json(os.path.join(tmp, json_name), job.skeleton, self.config.fsync)
        except OSError as e:
            raise CheckpointError(
                f"checkpoint step {job.step}: writing rank {self.rank}'s files in {tmp} failed: "
                f"{e} (disk full or not writable?); published snapshots are untouched"
            ) from e
        job.files = {
            data_name: data_crc,
            json_name: checksum_fn(self.checksum)(raw, 0),
        }

    def _publish(self, job: Job) -> None:
        mine: Any = repr(job.error) if job.error is not None else job.files
        infos = [mine]
        if self._group is not None:
            infos = [None] * self.world
            dist.all_gather_object(infos, mine, group=self._group)
        outcome = ""
        if self.rank == 0:
            outcome = self._commit(job, infos)
        if self._group is not None:
            box = [outcome]
            dist.broadcast_object_list(box, group=self._group, group_src=0)
            outcome = box[0]
        if outcome and job.error is None:
            raise CheckpointError(outcome)

    def _commit(self, job: Job, infos: list[Any]) -> str:
        bad = [f"rank {r}: {i}" for r, i in enumerate(infos) if isinstance(i, str)]
        tmp = self._tmp(job)
        if bad:
            P.shutil.rmtree(tmp, ignore_errors=True)
            return f"checkpoint step {job.step} was not published: " + "; ".join(bad)
        try:
            files: dict[str, int] = {}
            for info in infos:
                files.update(info)
            P.write_json(
                os.path.join(tmp, P.MANIFEST), self._manifest(job, files), self.config.fsync
            )
            P.publish(self.directory, tmp, job.step, self.config.fsync)
            P.rotate(self.directory, self.config.keep)
        except OSError as e:
            P.shutil.rmtree(tmp, ignore_errors=True)
            return f"checkpoint step {job.step}: publishing {tmp} failed: {e}"
        log.info("checkpoint: step %d published (%d ranks)", job.step, self.world)
        return ""

    def _manifest(self, job: Job, files: dict[str, int]) -> dict[str, Any]:
        return {
            "format": "memopt-checkpoint",
            "format_version": FORMAT_VERSION,
            "step": job.step,
            "world_size": self.world,
            "checksum": self.checksum,
            "files": files,
            "alignment": self.config.alignment,
            "versions": {
                "memopt": getattr(sys.modules.get("memopt"), "__version__", "unknown"),
                "torch": torch.__version__,
            },
            "metadata": self.metadata,
            "time": time.time(),
        }

    # -- completion -------------------------------------------------------------------
    def _raise_pending(self) -> None:
        for job in [j for j in self._jobs if j.done.is_set()]:
            self._jobs.remove(job)
            if job.error is not None and self._error is None and not job.reported:
                self._error = job.error
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"a background checkpoint save failed: {err!r}") from err

    def wait(self) -> None:
        """Block until every save so far is published; raise a background failure."""
        for job in list(self._jobs):
            job.done.wait()
        self._raise_pending()

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
    ) -> dict[str, Any]:
        """Restore a snapshot (``None``: the newest good one) and return its ``extra``."""
        self.wait()
        snap = self._open(step)
        if model is not None:
            R.restore_model(snap, model)
        if optimizer is not None:
            R.restore_optimizer(snap, optimizer, model, self.rank, self.world)
        if scheduler is not None:
            R.restore_scheduler(snap, scheduler, self.rank)
        if self.config.restore_rng:
            R.restore_rng(snap, self.rank)
        log.info("checkpoint: loaded step %d from %s", snap.step, snap.path)
        return R.restore_extra(snap, self.rank)

    def _open(self, step: int | None) -> Snapshot:
        if step is not None:
            path = P.step_dir(self.directory, step)
            if not os.path.isfile(os.path.join(path, P.MANIFEST)):
                raise FileNotFoundError(
                    f"AsyncCheckpointer.load: no published snapshot of step {step} in "
                    f"{self.directory} (published: {self.steps()})"
                )
            return Snapshot(path, self.config.verify)
        for s in reversed(self.steps()):
            try:
                return Snapshot(P.step_dir(self.directory, s), self.config.verify)
            except CorruptSnapshotError as e:
                warnings.warn(f"{e}; falling back to an older snapshot", stacklevel=3)
                log.warning("checkpoint: %s", e)
        raise FileNotFoundError(f"AsyncCheckpointer.load: no loadable snapshot in {self.directory}")

    def close(self) -> None:
        """Finish pending saves, stop the threads, release staging memory."""
        if self._closed:
            return
        self._closed = True
        try:
            for job in list(self._jobs):
                job.done.wait()
        finally:
            self._pipeline.close()
            for h in self._hooks.values():
                h.remove()
            self._hooks.clear()
            self.arena.close()
        self._raise_pending()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
