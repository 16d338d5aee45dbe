"""AdamW state on a storage tier, stepped through a double-buffered I/O pipeline.

Each tensor's fp32 master copy and its two moments live on a ``StorageTier`` in **chunks**
of at most ``bucket_bytes`` of state (``bucket_bytes / 12`` elements), one handle per chunk
laid out ``[master | exp_avg | exp_avg_sq]`` and padded to a 4096-byte multiple (one read and
one write per chunk and step; page-sized, so the NVMe tier moves it with O_DIRECT in place,
without bounce blocks). A step packs the chunks in order into **groups** of at most
``bucket_bytes`` of state and streams the groups through a ring of three staging buffers
(pinned arena blocks, page-aligned; so 3 x ``bucket_bytes`` of host memory whatever the
largest tensor):

    read(0)
    for i in groups:  wait read(i)
                      wait write(i-2); issue read(i+1)      # into the buffer write(i-2) used
                      update(i)                             # cpu_adamw_step_, copy-back
                      issue write(i)                        # in flight during update(i+1)
    wait every write

so the read of group i+1 and the write-back of group i-1 run while group i is updated: with
three buffers one holds the group being updated, one the group being read, one the group
being written. The update is the native ``cpu_adamw_step_`` on the staging views; the
updated master goes back into the model tensor (``out_lowp`` straight into a contiguous
bf16/fp16 CPU parameter, a ``copy_`` otherwise, which also covers a parameter on a device).

A tier with a ``view`` (the pinned CPU and NUMA tiers) is host memory already: the update runs
in place on the tier's views, no staging copies (``in_place``; DeepSpeed's CPU offload does
the same). ``events`` (when enabled) records ``(what, group)`` in order: ``read_issue``,
``read_done``, ``update_start``, ``update_end``, ``write_issue``; ``stats`` accumulates the
time spent waiting for I/O and updating. Gradients may be fp32, bf16 or fp16, on any device
(moved to the CPU per group).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from memopt.offload.adamw_checks import label, refresh_master
from memopt.offload.allocator import round_up
from memopt.offload.arena import ArenaBlock, PinnedArena, default_arena
from memopt.offload.host_update import cpu_batch, direct_lowp
from memopt.offload.hybrid import ByteCosts
from memopt.offload.hybrid_update import HybridUpdate
from memopt.offload.pipeline_items import AdamHyper, PipelineStats, StepItem
from memopt.offload.sigdefer import deferred_sigint
from memopt.offload.tier import IOFuture, StorageTier, TierHandle, settle, wait_all

__all__ = ["AdamHyper", "OffloadedAdamState", "PipelineStats", "StepItem"]

_PAD = 1024  # fp32 elements per 4096-byte page
RING = 3


@dataclass
class _Chunk:
    handle: TierHandle
    start: int  # first element of the tensor this chunk holds
    numel: int
    padded: int  # 3 * numel rounded up to a page of fp32


@dataclass
class _Entry:
    numel: int
    chunks: list[_Chunk]


@dataclass
class _Unit:
    item: StepItem
    chunk: _Chunk


class OffloadedAdamState:
    """fp32 master + moments of many tensors on one tier; ``step`` runs the pipeline."""

    def __init__(
        self,
        tier: StorageTier,
        *,
        bucket_bytes: int = 64 << 20,
        arena: PinnedArena | None = None,
        in_place: bool | None = None,
        record_events: bool = False,
        hybrid: HybridUpdate | None = None,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.tier = tier
        self.bucket_bytes = int(bucket_bytes)
        #: elements per chunk: a chunk's state fits one bucket (at least one page)
        self.chunk_elems = max(_PAD, (self.bucket_bytes // 12) // _PAD * _PAD)
        self.arena = arena or getattr(tier, "arena", None) or default_arena()
        self.in_place = hasattr(tier, "view") if in_place is None else bool(in_place)
        if self.in_place and not hasattr(tier, "view"):
            raise ValueError(f"in_place=True needs a host tier with view(); {tier.name!r} has none")
        self.events: list[tuple[str, int]] | None = [] if record_events else None
        self.hybrid = hybrid  # None: every group on the CPU (see hybrid_update.py)
        self.stats = PipelineStats()
        self._entries: dict[Hashable, _Entry] = {}
        self._ring: list[ArenaBlock] = []  # mutated in place: the finalizer holds it
        self._ring_elems = 0
        self.updates_begun = 0  # hyperparameter batches whose update began, this step
        self._stale: Collection[Hashable] = ()  # keys whose masters the step rebuilds
        # Dropped without close(): the staging ring goes back to the (process-wide) arena.
        # The state's handles are the tier's to free (its close() or its own finalizer).
        finalizer = weakref.finalize(self, _release_ring, self.arena, self._ring)
        finalizer.atexit = False

    # --- state ----------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def add(
        self, key: Hashable, master: Tensor, exp_avg: Tensor | None = None,
        exp_avg_sq: Tensor | None = None,
    ) -> None:  # fmt: skip
        """Put a tensor's state on the tier (moments default to zeros); replaces an old one.

        ``master`` may be in any floating dtype (a bf16 parameter): each chunk is converted
        to fp32 as it is copied, so no full-size fp32 temporary is made. All or nothing: the
        key is registered only once every chunk is written; an error or a Ctrl-C before that
        frees what was allocated and leaves the key absent (an old state is removed first).
        """
        n = master.numel()
        for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if t is not None and t.numel() != n:
                raise ValueError(f"{name} has {t.numel()} elements, the master has {n}")
        if key in self._entries:
            self.remove(key)
        # in place (host tier, no staging): one chunk per tensor; streamed: bucket-sized chunks
        step = max(n, 1) if self.in_place else self.chunk_elems
        chunks: list[_Chunk] = []
        srcs = [t if t is None else t.detach().reshape(-1) for t in (master, exp_avg, exp_avg_sq)]
        try:
            with deferred_sigint():  # no handle between allocate() and the list
                for start in range(0, max(n, 1), step):
                    c = min(step, n - start)
                    padded = round_up(max(3 * c, 1), _PAD)
                    handle = self.tier.allocate((padded,), torch.float32)
                    chunks.append(_Chunk(handle, start, c, padded))
            self._write(chunks, srcs)
        except BaseException:
            for ch in chunks:
                with contextlib.suppress(Exception):  # raising the first error, below
                    self.tier.free(ch.handle)
            raise
        self._entries[key] = _Entry(n, chunks)

    def _write(self, chunks: list[_Chunk], srcs: list[Tensor | None]) -> None:
        if self.in_place:  # write straight into the tier's memory
            for ch in chunks:
                _fill(self.tier.view(ch.handle), srcs, ch)  # type: ignore[attr-defined]
            return
        block = self.arena.alloc(max(ch.padded for ch in chunks) * 4, 4096)
        try:
            for ch in chunks:
                buf = self.arena.tensor(block, torch.float32)[: ch.padded]
                _fill(buf, srcs, ch)
                self._transfer("write", ch.handle, buf)
        finally:
            self.arena.free(block)

    def _transfer(self, op: str, handle: TierHandle, buf: Tensor) -> None:
        """One read or write, waited for. Whatever interrupts it (a Ctrl-C), it returns or
        raises only once the transfer is over: the caller then frees ``buf``'s block."""
        futs: list[IOFuture] = []
        try:
            with deferred_sigint():  # the future is in futs before a Ctrl-C can raise
                io = self.tier.read_async if op == "read" else self.tier.write_async
                futs.append(io(handle, buf))
            futs[0].wait()
        except BaseException:
            for fut in futs:
                settle(fut)
            raise

    def reserve(self, numels: Sequence[int]) -> None:
        """Make room for the state of tensors of ``numels`` elements that ``add`` will place
        next, in one piece: on an in-place (host) tier, one allocation of the exact total,
        freed at once, so the arena grows by exactly that (not by chunk-sized steps) and the
        ``add`` calls that follow fill it. Streamed tiers need nothing."""
        if not self.in_place or not numels:
            return
        total = sum(round_up(max(3 * n, 1), _PAD) for n in numels)
        self.tier.free(self.tier.allocate((total,), torch.float32))

    def read(self, key: Hashable) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of (master, exp_avg, exp_avg_sq), flat fp32 CPU tensors, read from the tier."""
        e = self._entry(key)
        out = tuple(torch.empty(e.numel) for _ in range(3))
        block = self.arena.alloc(max(ch.padded for ch in e.chunks) * 4, 4096)
        try:
            for ch in e.chunks:
                buf = self.arena.tensor(block, torch.float32)[: ch.padded]
                self._transfer("read", ch.handle, buf)
                for i in range(3):
                    out[i][ch.start : ch.start + ch.numel] = buf[i * ch.numel : (i + 1) * ch.numel]
            return out  # type: ignore[return-value]
        finally:
            self.arena.free(block)

    def remove(self, key: Hashable) -> None:
        for ch in self._entries.pop(key).chunks:
            self.tier.free(ch.handle)

    def nbytes(self) -> int:
        """Bytes of state on the tier (padded), for reports."""
        return sum(ch.padded * 4 for e in self._entries.values() for ch in e.chunks)

    def _entry(self, key: Hashable) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(
                f"no offloaded optimizer state for {label(key)}; add() it first"
            ) from None

    def close(self) -> None:
        for key in list(self._entries):
            self.remove(key)
        self._free_ring()

    def _free_ring(self) -> None:
        self._ring_elems = 0
        while self._ring:
            self.arena.free(self._ring.pop())

    # --- the step -------------------------------------------------------------------------
    def groups(self, items: Sequence[StepItem]) -> list[list[_Unit]]:
        """The items' chunks, in order, packed into groups of at most ``bucket_bytes`` of
        state (or one chunk, when ``bucket_bytes`` is below a page)."""
        out: list[list[_Unit]] = []
        size = 0
        for it in items:
            for ch in self._entry(it.key).chunks:
                nbytes = ch.padded * 4
                if out and size + nbytes <= self.bucket_bytes:
                    out[-1].append(_Unit(it, ch))
                    size += nbytes
                else:
                    out.append([_Unit(it, ch)])
                    size = nbytes
        return out

    def check(self, items: Sequence[StepItem]) -> None:
        """The ValueError ``step`` would raise for ``items`` (sizes, contiguity), if any."""
        for it in items:
            n = self._entry(it.key).numel
            if it.grad.numel() != n or it.param.numel() != n:
                raise ValueError(
                    f"offloaded AdamW state of {label(it.key)}: grad has {it.grad.numel()} "
                    f"elements, the parameter {it.param.numel()}, its state {n} (was the "
                    "parameter replaced by one of another size?); nothing was updated"
                )
            if not it.param.is_contiguous():
                raise ValueError(
                    f"offloaded AdamW state of {label(it.key)}: the tensor that receives the "
                    "update must be contiguous (step a contiguous copy and copy it back); "
                    "nothing was updated"
                )

    def step(self, items: Sequence[StepItem], refresh: Collection[Hashable] = ()) -> None:
        """Update every item's state and model tensor (see the module docstring). The
        masters of the keys in ``refresh`` (parameters written since their last step) are
        first rebuilt from the parameters (``adamw_checks.refresh_master``). From the first
        group's update on, ``updates_begun`` counts the updates started (0 when this raises
        before any: nothing changed)."""
        self.updates_begun = 0
        self.check(items)
        self._stale = refresh
        groups = self.groups(items)
        self.stats.groups = [len(g) for g in groups]
        self.stats.steps += 1
        if self.hybrid is not None and items:
            sizes = [sum(u.chunk.numel for u in g) for g in groups]
            g0, p0 = items[0].grad, items[0].param
            costs = ByteCosts(g0.element_size(), p0.element_size(), 12.0)
            self.hybrid.begin_step(sizes, costs)
        if self.in_place:
            for i, group in enumerate(groups):
                views = [self.tier.view(u.chunk.handle) for u in group]  # type: ignore[attr-defined]
                self._update(i, group, views)
            return
        self._streamed(groups)

    def _streamed(self, groups: list[list[_Unit]]) -> None:
        need = max((sum(u.chunk.padded for u in g) for g in groups), default=0)
        self._ensure_ring(need)
        reads: list[list[IOFuture]] = [[] for _ in groups]
        writes: list[list[IOFuture]] = [[] for _ in groups]
        try:
            if groups:
                self._io("read", 0, groups[0], reads[0])
            for i, group in enumerate(groups):
                self._wait(reads[i])
                self._log("read_done", i)
                if i + 1 < len(groups):
                    if i >= 2:
                        self._wait(writes[i - 2])  # its buffer is the one read(i+1) fills
                    self._io("read", i + 1, groups[i + 1], reads[i + 1])
                self._update(i, group, self._views(i, group))
                self._io("write", i, group, writes[i])
        finally:
            t0 = time.perf_counter()
            wait_all([f for fs in reads + writes for f in fs])
            self.stats.io_wait_s += time.perf_counter() - t0

    def _ensure_ring(self, elems: int) -> None:
        if elems <= self._ring_elems and len(self._ring) == RING:
            return
        self._free_ring()
        while len(self._ring) < RING:
            self._ring.append(self.arena.alloc(elems * 4, 4096))
        self._ring_elems = elems

    def _views(self, i: int, group: list[_Unit]) -> list[Tensor]:
        buf = self.arena.tensor(self._ring[i % RING], torch.float32)
        out, off = [], 0
        for u in group:
            out.append(buf[off : off + u.chunk.padded])
            off += u.chunk.padded
        return out

    def _io(self, op: str, i: int, group: list[_Unit], futs: list[IOFuture]) -> None:
        """Issue group i's reads or writes, each future into ``futs`` as soon as it exists
        (the step's ``finally`` waits for them even when a Ctrl-C stops the loop here: the
        ring buffer must not be reused under a transfer still in flight)."""
        with deferred_sigint():
            for u, view in zip(group, self._views(i, group), strict=True):
                handle = u.chunk.handle
                if op == "read":
                    futs.append(self.tier.read_async(handle, view))
                    self.stats.bytes_read += handle.nbytes
                else:
                    futs.append(self.tier.write_async(handle, view))
                    self.stats.bytes_written += handle.nbytes
        self._log(f"{op}_issue", i)

    def _wait(self, futs: list[IOFuture]) -> None:
        t0 = time.perf_counter()
        wait_all(futs)
        self.stats.io_wait_s += time.perf_counter() - t0

    def _log(self, what: str, i: int) -> None:
        if self.events is not None:
            self.events.append((what, i))

    def _update(self, i: int, group: list[_Unit], views: list[Tensor]) -> None:
        """Update one group, one call per hyperparameter/dtype batch: on the CPU
        (``host_update.cpu_batch``) or, when the hybrid scheduler says so, on the device."""
        self._log("update_start", i)
        t0 = time.perf_counter()
        batches: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = {}
        for u, view in zip(group, views, strict=True):
            s, n = u.chunk.start, u.chunk.numel
            g = u.item.grad.detach().reshape(-1)[s : s + n]
            param = u.item.param.detach().view(-1)[s : s + n]
            if u.item.key in self._stale:
                refresh_master(view[:n], param)
            lowp = direct_lowp(param)
            key = (u.item.hyper, g.dtype, None if lowp is None else lowp.dtype)
            batches.setdefault(key, []).append((view, g, param))
        on_device = self.hybrid is not None and self.hybrid.where(i) == "device"
        for (hyper, _gd, lowp_dtype), triples in batches.items():
            self.updates_begun += 1
            if on_device and hyper.eps_mode == "torch":
                assert self.hybrid is not None
                self.hybrid.device_step(hyper, triples, triples[0][2].device)
            else:
                cpu_batch(hyper, lowp_dtype is not None, triples, self.hybrid)
        self.stats.update_s += time.perf_counter() - t0
        self._log("update_end", i)


def _release_ring(arena: PinnedArena, ring: list[ArenaBlock]) -> None:
    """The finalizer of a state never closed (holds the arena and the ring, not the state)."""
    held = list(ring)
    ring.clear()
    arena.release(held)


def _fill(buf: Tensor, srcs: list[Tensor | None], ch: _Chunk) -> None:
    """``buf`` <- ``[master | exp_avg | exp_avg_sq]`` of one chunk (zeros where None)."""
    buf.zero_()
    for i, t in enumerate(srcs):
        if t is not None:
            buf[i * ch.numel : (i + 1) * ch.numel].copy_(t[ch.start : ch.start + ch.numel])
