"""The two background stages of a save: device -> host staging copy, then host -> disk.

Stage 1 (copier thread) copies every captured tensor into its slot of one host staging block
from the pinned arena (``memopt.offload.PinnedArena``), laid out exactly as the file's data
section. On CUDA the copies run on a side stream that first waits on an event recorded on the
training stream at ``save`` time, with ``non_blocking`` copies into pinned memory, and the
thread waits on a completion event; on CPU they are plain copies in the thread. Either way
``job.copied`` is set when the staging block holds the values of the save's moment.

Stage 2 (writer thread) writes the rank's safetensors file and JSON, fsyncs them, frees the
staging block, then calls ``publish_fn`` (the barrier over ranks and rank 0's atomic rename).
It gets each job as soon as its staging block exists and starts writing
(``record.write_start_s``; ``writer.py``: a preallocated file, several writes in flight) when
the whole data section is staged. Why not overlap the two: CUDA staging is complete only when
its one completion event fires anyway, and on the CPU path the copy and the writes compete for
the same cores and memory bandwidth, and the copy is what the next ``optimizer.step`` waits
for (the fence): on the 2-core VM of docs/benchmarks.md the copy of 1.2 GB took 0.35 s alone
and 0.9 s under the writes. By time to durable the A/B there was mixed (overlap better with
the loop idle, either one ahead while training). ``follow_copy=True`` restores the overlap:
the writer starts once the first chunk is staged and waits before each chunk until the
copier has staged that prefix (``wait_copied``, per tensor on CPU).
CPU tensors are copied by the copier thread alone (``_copy_one_thread``: numpy's copy, the GIL
released), not by torch's ``copy_``, which starts an OpenMP team of every core for the copier
thread: the copy is bound by memory bandwidth, so the team buys little wall time for twice the
CPU (1.2 GB of model-sized tensors into staging on the 2-core VM of docs/benchmarks.md: 0.17 s
and 0.18 CPU s on one thread, 0.11 s and 0.23 CPU s on two), CPU that a training loop on the
same cores loses. ``copy_team = True`` restores the team (the benchmark's A/B).
``fuse_checksum`` (``CheckpointConfig.checksum_in_copy``, on by default): CPU tensors are
copied and their CRC-32C computed in one pass (``copy_crc``: the source read from memory
once), and the writer makes no checksum pass. Native code and numpy only ever read plain
tensors over memory of their own (``copy_crc.has_own_memory``); a tensor subclass goes
through torch's ``copy_``.
``nice`` (``CheckpointConfig.background_nice``) lowers both threads' CPU priority.
Jobs go through both stages in save order. A failure is kept on the job and raised from
``wait()``; it never touches published snapshots.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memopt._utils import warn_once
from memopt.checkpoint.capture import Entry
from memopt.checkpoint.checksum import checksum_fn
from memopt.checkpoint.commit import FORMAT_VERSION
from memopt.checkpoint.copy_crc import available as fused_ok
from memopt.checkpoint.copy_crc import copy_crc32c, has_own_memory
from memopt.checkpoint.fileformat import FilePlan, plan_file
from memopt.checkpoint.stats import SaveRecord
from memopt.checkpoint.writer import CHUNK, tensor_bytes
from memopt.offload.arena import ArenaBlock, PinnedArena
from memopt.offload.hostmem import PAGE_SIZE

STAGING_GRANULE = 1 << 20  # staging blocks are whole MiB


@dataclass(eq=False)
class Job:
    step: int
    seq: int
    entries: list[Entry]
    skeleton: dict[str, Any]
    plan: FilePlan
    record: SaveRecord
    t0: float
    alignment: int = 64
    block: ArenaBlock | None = None  # taken by the copier (pinning a new chunk takes time)
    staging: torch.Tensor | None = None  # uint8, the data section
    ready: list[Any] = field(default_factory=list)  # CUDA events on the training streams
    copied: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    files: dict[str, int] = field(default_factory=dict)  # file name -> checksum
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes written
    claim: Any = None  # this rank's lock on the temporary directory (``tmpdirs.Claim``)
    reported: bool = False  # the error was already raised to the caller (from save)
    skipped: str = ""  # why this rank's save() made no snapshot (it raised an earlier failure)
    by_peer: bool = False  # failed only because other ranks skipped it (``skipped``)
    copied_upto: int = 0  # bytes of the data section already in staging (a prefix)
    progress: threading.Condition = field(default_factory=threading.Condition)
    file_crc: int | None = None  # crc of header + data section, when the copier computed it
    later_steps: list[int] = field(default_factory=list)  # published steps > step (rank 0)
    owner: Any = None  # the checkpointer, from the hand-over until done (``lifetime``)

    def copied_checksum(self) -> int | None:
        """The file's checksum computed by the copier (after the copy), else None."""
        self.copied.wait()
        return self.file_crc

    def advance(self, upto: int) -> None:
        with self.progress:
            self.copied_upto = upto
            self.progress.notify_all()

    def wait_copied(self, upto: int) -> None:
        """Block until the first ``upto`` bytes of the data section are staged."""
        with self.progress:
            self.progress.wait_for(lambda: self.copied_upto >= upto)


def new_job(
    step: int, seq: int, entries: list[Entry], skel: dict[str, Any], t0: float, alignment: int
) -> Job:
    """The job of one save: the file plan of ``entries``, the tensor table of ``skel``, and an
    event on each CUDA device's current stream (the copy waits for the work before it)."""
    plan = plan_file(
        [(e.name, e.tensor.dtype, e.tensor.shape) for e in entries],
        alignment,
        {"format": "pt", "memopt_format": str(FORMAT_VERSION)},
    )
    skel["tensors"] = {
        e.name: {"global_shape": list(e.global_shape), "row_offset": e.row_offset}
        for e in entries
    }
    job = Job(step, seq, entries, skel, plan, SaveRecord(step), t0, min(alignment, PAGE_SIZE))
    for d in {e.tensor.device for e in entries if e.tensor.device.type == "cuda"}:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(d))
        job.ready.append(ev)
    job.record.nbytes = len(plan.header) + plan.data_bytes
    return job


class Pipeline:
    """Copier and writer threads over a queue of jobs.

    ``follow_copy``: the writer starts once the first chunk is staged and follows the copy
    (default False: it starts when the copy has finished; see the module docstring)."""

    follow_copy = False
    copy_team = False  # CPU copies by torch's OpenMP team instead of the copier thread alone

    def __init__(
        self,
        arena: PinnedArena,
        write_fn: Callable[[Job], None],
        publish_fn: Callable[[Job], None],
        on_done: Callable[[], None],
        *,
        nice: int = 0,
        fuse_checksum: bool = False,
        finished: Callable[[Job], None] | None = None,
    ) -> None:
        self.arena, self._write, self._publish = arena, write_fn, publish_fn
        self._finished = finished  # called with each job once its outcome is final
        self.nice = nice
        # CPU copies also compute the file's CRC-32C (the caller passes True only for crc32c)
        self.fuse_checksum = fuse_checksum and fused_ok()
        self._on_done = on_done
        self._copy_q: queue.Queue[Job | None] = queue.Queue()
        self._write_q: queue.Queue[Job | None] = queue.Queue()
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.threads = [
            threading.Thread(target=self._niced(self._copier), name="memopt-ckpt-copy",
                             daemon=True),
            threading.Thread(target=self._niced(self._writer), name="memopt-ckpt-write",
                             daemon=True),
        ]  # fmt: skip
        for t in self.threads:
            t.start()

    def _niced(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if self.nice:
                lower_priority(self.nice)
            body()

        return run

    def submit(self, job: Job) -> None:
        self._copy_q.put(job)

    def _copier(self) -> None:
        while (job := self._copy_q.get()) is not None:
            cpu0 = time.thread_time()
            for stage in (self._stage, self._copy):
                try:
                    if job.error is None:
                        stage(job)
                except BaseException as e:  # noqa: BLE001 - kept and raised from wait()
                    job.error = e
                if stage == self._stage:  # the writer follows the copy, chunk by chunk
                    self._write_q.put(job)
            job.entries = []  # drop the references to live tensors
            job.record.background_cpu_s += time.thread_time() - cpu0
            job.record.copied_s = time.perf_counter() - job.t0
            job.advance(job.plan.data_bytes)  # (also releases the writer after a failure)
            job.copied.set()
            del job  # (a failed job's traceback may hold its checkpointer: ``lifetime``)
        self._write_q.put(None)

    def _stage(self, job: Job) -> None:
        # Sizes rounded up to a granule, so a snapshot that grew a little (an extra, the first
        # optimizer state) reuses the last one's staging; free chunks too small are unmapped
        # instead of kept forever.
        need = -(-max(job.plan.data_bytes, 1) // STAGING_GRANULE) * STAGING_GRANULE
        report = self.arena.report()
        if report.capacity_bytes - report.reserved_bytes < need:
            self.arena.trim()
        job.block = self.arena.alloc(need, alignment=job.alignment)
        job.staging = staging = self.arena.bytes_view(job.block)[: job.plan.data_bytes]
        for lo, hi in job.plan.pads:  # deterministic bytes between tensors
            staging[lo:hi].zero_()

    def _copy(self, job: Job) -> None:
        slots = [(e.tensor, self._slot(job, e)) for e in job.entries]
        on_device = [(src, dst) for src, dst in slots if src.device.type == "cuda"]
        if not on_device and not self.copy_team and self.fuse_checksum:
            self._copy_and_checksum(job, slots)
            return
        for e, (src, dst) in zip(job.entries, slots, strict=True):
            if src.device.type != "cuda":
                if self.copy_team or not _copy_one_thread(dst, src):
                    dst.copy_(src)
                if not on_device:  # a staged prefix: the writer may write up to here
                    job.advance(job.plan.offsets[e.name] + dst.numel() * dst.element_size())
        if on_device:
            assert self._stream is not None
            with torch.cuda.stream(self._stream):
                for ev in job.ready:
                    self._stream.wait_event(ev)
                for src, dst in on_device:
                    dst.copy_(src, non_blocking=True)
                finished = torch.cuda.Event()
                finished.record(self._stream)
            finished.synchronize()

    @staticmethod
    def _copy_and_checksum(job: Job, slots: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """CPU tensors: copy each into its slot and continue the file's CRC-32C over it in the
        same pass (``copy_crc``), in file order, padding included; the writer then has no
        checksum pass to make (``Job.file_crc``)."""
        assert job.staging is not None
        crc = checksum_fn("crc32c")
        value, pos = crc(job.plan.header, 0), 0
        flat = job.staging
        order = sorted(zip(job.entries, slots, strict=True),
                       key=lambda es: job.plan.offsets[es[0].name])  # fmt: skip
        for e, (src, dst) in order:
            off = job.plan.offsets[e.name]
            nbytes = dst.numel() * dst.element_size()
            value = crc(tensor_bytes(flat[pos:off]), value)  # the padding before it
            if src.is_contiguous() and has_own_memory(src):
                value = copy_crc32c(flat[off : off + nbytes], src, value)
            else:  # a transposed basis, a tensor subclass: torch copies, then the checksum
                dst.copy_(src)
                value = crc(tensor_bytes(flat[off : off + nbytes]), value)
            pos = off + nbytes
            job.advance(pos)
        job.file_crc = crc(tensor_bytes(flat[pos:]), value)

    @staticmethod
    def _slot(job: Job, e: Entry) -> torch.Tensor:
        assert job.staging is not None
        off = job.plan.offsets[e.name]
        nbytes = e.tensor.numel() * e.tensor.element_size()
        return job.staging[off : off + nbytes].view(e.tensor.dtype).view(e.tensor.shape)

    def _writer(self) -> None:
        while (job := self._write_q.get()) is not None:
            cpu0 = time.thread_time()
            try:
                if job.error is None:
                    first = CHUNK if self.follow_copy else job.plan.data_bytes
                    job.wait_copied(min(first, job.plan.data_bytes))
                    job.record.write_start_s = time.perf_counter() - job.t0
                    self._write(job)
                    job.record.written_s = time.perf_counter() - job.t0
            except BaseException as e:  # noqa: BLE001 - kept and raised from wait()
                job.error = e
            finally:
                job.copied.wait()  # (a failed write leaves early: the copy still uses staging)
                if job.block is not None:
                    self.arena.free(job.block)
                    job.block = job.staging = None
            try:
                self._publish(job)  # collective: runs even after a local failure
            except BaseException as e:  # noqa: BLE001
                job.error = job.error or e
            job.record.durable_s = time.perf_counter() - job.t0
            # (the copier added its CPU time before setting ``copied``, waited for above)
            job.record.background_cpu_s += time.thread_time() - cpu0
            job.record.ok = job.error is None
            if self._finished is not None:
                self._finished(job)
            job.done.set()
            self._on_done()
            job.owner = None  # the last reference to a dropped checkpointer, maybe: ``lifetime``
            del job

    def close(self) -> None:
        """Stop both threads once the queued jobs are done (called from the writer itself by
        the finalizer of a checkpointer dropped while saving: it does not join itself)."""
        self._copy_q.put(None)
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()


class Slots:
    """``max_inflight``: at most ``n`` saves staged at once, counted from the saves themselves
    (handed to the pipeline and not done) rather than taken from a semaphore, so a ``save``
    interrupted before its hand-over (a Ctrl-C, an error in the capture) holds no slot."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._cond = threading.Condition()

    def wait(self, jobs: list[Job]) -> None:
        """Block until fewer than ``n`` of ``jobs`` are unfinished (``jobs``: the caller's)."""
        with self._cond:
            self._cond.wait_for(lambda: sum(not j.done.is_set() for j in jobs) < self.n)

    def release(self) -> None:
        """A job is done (the writer, after ``job.done.set()``)."""
        with self._cond:
            self._cond.notify_all()


def lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness to ``nice`` (Linux schedules threads one by one)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except (AttributeError, OSError) as e:  # not Linux, or not permitted
        warn_once(f"CheckpointConfig.background_nice: cannot lower this thread's priority ({e})")


def _copy_one_thread(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Copy a contiguous CPU tensor on this thread alone (numpy's copy: no OpenMP team, the
    GIL released); False when the layout (or a tensor subclass) needs torch's copy."""
    if not (src.is_contiguous() and dst.is_contiguous() and src.dtype == dst.dtype):
        return False
    if not (has_own_memory(src) and has_own_memory(dst)):
        return False
    if src.numel() == 0:
        return True
    np.copyto(dst.view(-1).view(torch.uint8).numpy(), src.view(-1).view(torch.uint8).numpy())
    return True
