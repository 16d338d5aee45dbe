"""The in-memory redundancy tier of ``AsyncCheckpointer`` (REFT): each save's staged bytes are
kept on this rank and protected on peers, in the background, next to the disk write.

Per save, with ``AsyncCheckpointer(..., redundancy=RedundancyConfig(...))``:

1. Writer thread, while it writes the rank's files: ``begin(job)`` starts a mirror-copy thread
   that, once the device->host copy is complete (so that it never slows the copy the fence
   waits for), copies the rank's file image (the plan's header, then the staged data section)
   into a *mirror* block of the tier's own host arena (a host memcpy, no second device copy; it
   overlaps the disk write). ``end(job)`` waits for it before the staging block is released.
   A mirror also holds the rank's JSON skeleton (step, extras, RNG, optimizer metadata).
2. Mirror-copy thread, as soon as the mirror is complete (the disk write goes on): the mirror
   is queued for the protector thread (None: this rank could not stage it, or the protector is
   ``max_pending`` saves behind). A save that never reached the writer is queued as None at
   publish (``submit``). The writer handles saves one at a time and the mirror thread is one
   thread, so every rank queues every save once, in save order.
3. Protector thread, save by save in save order, on the tier's dedicated gloo group: an
   all-gather of ``[has mirror, step]``; unless every rank of the group has a mirror of the
   same step, every rank skips this save (the previous protection stays). Otherwise
   ``PeerRedundancy.protect_blob(step, mirror)`` (replicas on the next ranks of a ring, or
   erasure-coded parity) and the mirror becomes the rank's own protected snapshot; the previous
   one is freed. Disk and memory tiers are independent: a failed disk write still protects the
   staged bytes, a failed protect never touches published files.

``recover(step)`` is collective over the checkpointer's group: the ranks all-gather the step
they hold (None: a replacement, or a rank that lost its memory); they agree that the survivors
hold one step (the requested one, when given) or all raise ``PeerRecoveryError``; each
redundancy group rebuilds its lost members (``rebuild_blob``; too many lost: the error is
all-gathered, so every rank raises it); then every rank broadcasts its blob, so each rank
holds the whole snapshot in host memory (as a disk load reads every rank's files) and returns a
``MemorySnapshot`` that ``restore.*`` loads exactly as the files. Its errors name ranks as
ranks of the checkpointer's group with their global ranks beside them; ``PeerRedundancy``'s
own messages, quoted in them, count ranks of the redundancy group (global ranks given too).

The tier's group is its own (``groups.make_group`` over the checkpointer's ranks, destroyed
at ``close()``) unless ``redundancy_group=`` was given (the caller's: left alone). The mirror
copy runs on a ``Workers`` thread started with the tier (not a ``concurrent.futures`` pool,
which refuses work once the main thread has returned, while saves may still be finishing).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from memopt._utils import get_logger
from memopt._utils.workers import Workers
from memopt.checkpoint.errors import CheckpointError, PeerRecoveryError
from memopt.checkpoint.groups import check_group, make_group, release
from memopt.checkpoint.mirror import MemorySnapshot, mirror_prefix
from memopt.checkpoint.pipeline import STAGING_GRANULE, Job
from memopt.checkpoint.redundancy import PeerRedundancy
from memopt.checkpoint.redundancy_config import RedundancyConfig
from memopt.checkpoint.stats import SaveRecord
from memopt.offload.arena import ArenaBlock, ArenaConfig, PinnedArena

log = get_logger("memopt.checkpoint")


@dataclass
class Mirror:
    step: int
    blob: torch.Tensor  # 1-D uint8 (a view of ``block``, or a rebuilt tensor)
    block: ArenaBlock | None = None


@dataclass
class _Item:
    step: int
    mirror: Mirror | None
    record: SaveRecord
    t0: float


class PeerTier:
    """Mirrors, protector thread and recovery; see the module docstring."""

    def __init__(
        self, config: RedundancyConfig, group: Any, ckpt_group: Any, max_pending: int,
        owned: bool = False,
    ) -> None:  # fmt: skip
        # The tier keeps each rank's mirror itself, so erasure coding needs no second copy.
        inner = dataclasses.replace(config, own="reference") if config.mode == "erasure" else config
        self.config = config
        self.red = PeerRedundancy(inner, group)
        self.group, self.ckpt_group, self._owned = group, ckpt_group, owned  # owned: close frees
        self.members = dist.get_process_group_ranks(group)  # global ranks of the tier's group
        self.ckpt_members = dist.get_process_group_ranks(ckpt_group)  # and of the checkpointer's
        self.max_pending = max_pending
        self.arena = PinnedArena(ArenaConfig(chunk_bytes=0, alignment=64, pin="off"))
        self.own: Mirror | None = None
        self._lock = threading.Lock()  # the arena's trim vs. blocks in use, own
        self._futures: dict[int, Future[None]] = {}
        self._begun: set[int] = set()  # saves whose mirror copy was started (writer thread)
        self._copy = Workers(1, "memopt-ckpt-mirror")
        self._q: queue.Queue[_Item | None] = queue.Queue()
        self._error: BaseException | None = None
        self._keep_memory = False
        self._thread = threading.Thread(target=self._protector, name="memopt-ckpt-peer")
        self._thread.daemon = True
        self._thread.start()

    # -- stage: staging -> mirror (writer thread, mirror-copy thread) ---------------------
    def begin(self, job: Job, rank: int, world: int) -> None:
        self._begun.add(job.seq)
        self._futures[job.seq] = self._copy.submit(self._mirror_and_queue, job, rank, world)

    def end(self, job: Job) -> None:
        """Wait for ``begin(job)``'s mirror copy (the staging block is released after this)."""
        fut = self._futures.pop(job.seq, None)
        if fut is not None:
            fut.result()

    def _mirror_and_queue(self, job: Job, rank: int, world: int) -> None:
        mirror = None
        try:
            mirror = self._mirror(job, rank, world)
        except Exception as e:  # noqa: BLE001 - this save is then skipped by the tier
            log.warning("checkpoint: step %d not mirrored for peers: %r", job.step, e)
        finally:  # queued at once, next to the disk write (every job once, in save order)
            self._enqueue(job, mirror)

    def _mirror(self, job: Job, rank: int, world: int) -> Mirror | None:
        plan = job.plan
        prefix = mirror_prefix(job.step, rank, world, job.skeleton, plan.header, plan.data_bytes)
        total = len(prefix) + plan.data_bytes
        need = -(-total // STAGING_GRANULE) * STAGING_GRANULE
        with self._lock:
            report = self.arena.report()
            if report.capacity_bytes - report.reserved_bytes < need:
                self.arena.trim()
            block = self.arena.alloc(need, alignment=4096)
        blob = self.arena.bytes_view(block)[:total]
        mirror = Mirror(job.step, blob, block)
        blob[: len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
        # Only once the device->host copy is complete: running beside it would slow the copy
        # that the training loop's fence waits for (the stall); the disk write goes on meanwhile.
        job.wait_copied(plan.data_bytes)
        if job.error is not None or job.staging is None:  # not the save's values
            self._free(mirror)
            return None
        blob[len(prefix) :].copy_(job.staging)
        return mirror

    def _free(self, mirror: Mirror | None) -> None:
        if mirror is not None and mirror.block is not None:
            with self._lock:
                self.arena.free(mirror.block)
            mirror.block = None

    # -- protect (protector thread) ---------------------------------------------------------
    def submit(self, job: Job) -> None:
        """At publish: queue a save that never reached ``begin`` (it failed before the write),
        so that every rank queues every save, in order (the protector is collective)."""
        if job.seq in self._begun:
            self._begun.discard(job.seq)
        else:
            self._enqueue(job, None)

    def _enqueue(self, job: Job, mirror: Mirror | None) -> None:
        if mirror is not None and self._q.qsize() >= self.max_pending:
            log.warning("checkpoint: peers are %d saves behind; step %d is not protected",
                        self._q.qsize(), job.step)  # fmt: skip
            self._free(mirror)
            mirror = None
        self._q.put(_Item(job.step, mirror, job.record, job.t0))

    def _protector(self) -> None:
        while (item := self._q.get()) is not None:
            try:
                self._protect(item)
            except BaseException as e:  # noqa: BLE001 - kept and raised from wait()
                self._error = self._error or e
            finally:
                self._q.task_done()
        self._q.task_done()

    def _protect(self, item: _Item) -> None:
        mine = torch.tensor([int(item.mirror is not None), item.step], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in self.members]
        dist.all_gather(rows, mine, group=self.group)
        missing = [self.members[i] for i, r in enumerate(rows) if not r[0]]
        if missing or len({int(r[1]) for r in rows}) > 1:
            self._free(item.mirror)
            item.record.protect_note = f"skipped: global ranks {missing} had no staged copy"
            return
        assert item.mirror is not None
        try:
            self.red.protect_blob(item.step, item.mirror.blob)
        except BaseException:
            self._free(item.mirror)
            if self.own is not None and self.red.step != self.own.step:
                self._drop_own()  # the peers' pieces of it are gone too
            item.record.protect_note = "failed"
            raise
        old, self.own = self.own, item.mirror
        self._free(old)
        item.record.protected_s = time.perf_counter() - item.t0
        item.record.protected = True

    def _drop_own(self) -> None:
        old, self.own = self.own, None
        self._free(old)

    # -- completion -------------------------------------------------------------------------
    def join(self) -> None:
        """Block until every submitted save was protected or skipped."""
        self._q.join()

    def busy(self) -> bool:
        """Whether a submitted save is still being protected (or waits to be)."""
        return self._q.unfinished_tasks > 0

    def raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(
                f"in-memory redundancy: protecting a save on peers failed: {err!r}; the disk "
                "snapshots are unaffected, the in-memory tier keeps its last protected step "
                f"({self.protected_step})"
            ) from err

    @property
    def protected_step(self) -> int | None:
        own = self.own
        return None if own is None else own.step

    def memory_bytes(self) -> int:
        """Host bytes of the tier: this rank's own mirror plus the peers' pieces it holds."""
        own = self.own
        return (0 if own is None else own.blob.numel()) + self.red.memory_bytes()

    def adopt(self, old: PeerTier, close_old: Any) -> None:
        """Take over ``old``'s protected snapshot and peers' pieces (same process, new groups)."""
        if old.config.fingerprint() != self.config.fingerprint():
            raise ValueError(
                f"adopt: the old checkpointer's redundancy {old.config} differs from {self.config}"
            )
        old._keep_memory = True
        try:
            close_old()
        except CheckpointError as e:
            log.warning("checkpoint: the adopted checkpointer reported: %s", e)
        self.arena.close()
        self.arena, self.own = old.arena, old.own
        self.red.take_over(old.red)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._copy.close()
        if self._owned:  # (after the protector's last collective; gone already: nothing)
            release(self.group)
            self._owned = False
        if not self._keep_memory:
            self.own = None
            self.arena.close()

    # -- recovery (collective over the checkpointer's group) -------------------------------
    def recover(self, step: int | None, rank: int, world: int) -> MemorySnapshot:
        held: list[Any] = [None] * world
        dist.all_gather_object(held, self.protected_step, group=self.ckpt_group)
        lost = [r for r, s in enumerate(held) if s is None]
        steps = sorted({int(s) for s in held if s is not None})
        if not steps:
            raise PeerRecoveryError(
                "no rank holds an in-memory snapshot (nothing was protected yet, or every rank "
                "lost its memory): load from disk instead"
            )
        if len(steps) > 1 or (step is not None and steps != [step]):
            want = "" if step is None else f"; step {step} was requested"
            by_rank = {f"{r} (global {self.ckpt_members[r]})": s for r, s in enumerate(held)}
            raise PeerRecoveryError(
                "peers cannot rebuild the snapshot: the ranks of the checkpointer's group hold "
                f"steps {by_rank} (rank -> step, None: lost){want}"
            )
        blob, problem = self._rebuild(lost, rank)
        problems = [""] * world
        dist.all_gather_object(problems, problem, group=self.ckpt_group)
        glob = self.ckpt_members
        bad = [f"rank {r} (global {glob[r]}): {p}" for r, p in enumerate(problems) if p]
        if bad:
            raise PeerRecoveryError(
                f"peers cannot rebuild lost {self._named(lost)}; " + "; ".join(bad)
            )
        assert blob is not None
        return MemorySnapshot(self._exchange(blob, rank, world), f"peer memory (step {steps[0]})")

    def _rebuild(self, lost: list[int], rank: int) -> tuple[torch.Tensor | None, str]:
        glob = dist.get_process_group_ranks(self.ckpt_group)
        lost_here = [i for i, g in enumerate(self.members) if glob.index(g) in lost]
        blob = None if self.own is None else self.own.blob
        if not lost_here:
            return blob, ""
        try:
            got = self.red.rebuild_blob(lost_here)
        except (ValueError, RuntimeError) as e:  # (its ranks count the redundancy group)
            return blob, f"{e} [in that message, ranks of the redundancy group, whose global " \
                f"ranks are {self.members} in group order]"  # fmt: skip
        if got is not None:
            self.own = Mirror(got[0], got[1])
            blob = got[1]
        return blob, ""

    def _named(self, ranks: list[int]) -> str:
        """``ranks`` of the checkpointer's group, with their global ranks."""
        return f"ranks {ranks} of the checkpointer's group (global ranks " \
            f"{[self.ckpt_members[r] for r in ranks]})"  # fmt: skip

    def _exchange(self, blob: torch.Tensor, rank: int, world: int) -> list[torch.Tensor]:
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([blob.numel()]), group=self.ckpt_group)
        out = []
        for r in range(world):
            buf = blob if r == rank else torch.empty(int(sizes[r]), dtype=torch.uint8)
            dist.broadcast(buf, group=self.ckpt_group, group_src=r)
            out.append(buf)
        return out


def check_tier(config: Any, group: Any, adopt: Any, ckpt_group: Any) -> None:
    """The arguments of ``AsyncCheckpointer(redundancy=, redundancy_group=, adopt=,
    process_group=ckpt_group)``, checked before any collective (so that no rank waits in one
    for a rank that raised)."""
    if config is None:
        if adopt is not None:
            raise ValueError("AsyncCheckpointer(adopt=...) needs redundancy=RedundancyConfig")
        if group is not None:
            raise ValueError("AsyncCheckpointer(redundancy_group=...) needs "
                             "redundancy=RedundancyConfig(...)")  # fmt: skip
        return
    if not isinstance(config, RedundancyConfig):
        raise TypeError(f"redundancy must be a RedundancyConfig, got {type(config).__name__}")
    ckpt_group = check_group(ckpt_group, "process_group")
    if check_group(group, "redundancy_group") is not None:
        ranks = dist.get_process_group_ranks(dist.group.WORLD if ckpt_group is None else ckpt_group)
        outside = sorted(set(dist.get_process_group_ranks(group)) - set(ranks))
        if outside:
            raise ValueError(
                f"AsyncCheckpointer: redundancy_group has global ranks {outside} outside the "
                f"checkpointer's process group (global ranks {ranks}); pass a group of its ranks"
            )
    if adopt is not None and not isinstance(getattr(adopt, "peers", None), PeerTier):
        raise TypeError("adopt= must be an AsyncCheckpointer built with redundancy=")


def build_tier(config: Any, group: Any, adopt: Any, ckpt_group: Any, ck: Any) -> PeerTier | None:
    """The tier of ``AsyncCheckpointer(redundancy=config, redundancy_group=group, adopt=...)``
    (arguments checked by ``check_tier``); a collective over the checkpointer's group."""
    if config is None:
        return None
    if ckpt_group is None:
        raise ValueError(
            "AsyncCheckpointer(redundancy=...) keeps snapshots in peers' memory: it needs 2+ "
            "ranks of an initialized process group; pass redundancy=None on one process"
        )
    ranks = dist.get_process_group_ranks(ckpt_group)
    owned = group is None
    if owned:  # never training's groups
        group = make_group(ranks, ckpt_group)
    try:
        tier = PeerTier(config, group, ckpt_group, ck.max_inflight, owned=owned)
    except BaseException:
        if owned:
            release(group)
        raise
    if adopt is not None:
        try:
            tier.adopt(adopt.peers, adopt.close)
        except BaseException:
            tier.close()
            raise
    return tier
