"""One exact-size pinned host arena shared by everything memopt keeps in host memory.

Layout: a list of chunks, each one ``HostBuffer`` (page-aligned ``mmap``, pinned with
``cudaHostRegister`` or ``mlock`` when possible) carved by its own ``FreeListAllocator``
(best fit, coalescing, 64-byte granule, per-request alignment such as 4096 for O_DIRECT).
A request is served from the first chunk whose allocator has a fitting free block; when none
has, the arena **grows by one chunk** of ``max(chunk_bytes, the request rounded up to a
page)``; ``chunk_bytes=0`` makes every growth exactly the request's size. Blocks never span
chunks (chunks are separate mappings). ``trim()`` unmaps chunks that hold no blocks.

So the arena reserves what was asked for (rounded to 64 bytes and the alignment), never
``2**ceil(log2 n)`` as torch's caching host allocator does, and never ``count x largest`` as
DeepSpeed's swap pools do. ``report()`` gives requested / reserved / pinned / capacity bytes.

``huge_pages`` ("auto" / "required"; default "off") backs chunks with transparent huge pages
(see ``hostmem``): then, and only when THP is enabled, each chunk is rounded up to a whole
number of huge pages (2 MiB) so that all of it can be huge; ``report()``'s capacity includes
that rounding and ``huge_pages()`` says how many bytes were added by it and how many are
verified huge.

``tensor(block, dtype, shape)`` is a typed view into the arena (no copy). A view must not be
used after its block is freed: the bytes may be handed to someone else.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from memopt.offload.allocator import FreeListAllocator, round_up
from memopt.offload.hostmem import (
    PAGE_SIZE,
    HostBuffer,
    HostMapError,
    HugePageMode,
    PinMode,
    huge_page_size,
    thp_mode,
)
from memopt.offload.tier import TierReport

__all__ = ["ArenaBlock", "ArenaConfig", "HugePageReport", "PinnedArena", "default_arena"]


@dataclass(frozen=True)
class ArenaConfig:
    """How the arena gets its memory.

    initial_bytes: mapped at construction (0: the first request maps its chunk).
    chunk_bytes: size of each chunk added when the arena is full (0: exactly the request).
    granule: every block is a multiple of this (exact size up to a cache line).
    alignment: default block alignment; a request may ask for more (4096 for O_DIRECT).
    pin: "auto" pins or warns once and falls back; "required" raises; "off" never pins.
    huge_pages: back chunks with transparent huge pages: "auto" (falls back to 4 KiB pages,
        one warning), "required" (raises naming the sysfs setting) or "off".
    """

    initial_bytes: int = 0
    chunk_bytes: int = 256 << 20
    granule: int = 64
    alignment: int = 64
    pin: PinMode = "auto"
    huge_pages: HugePageMode = "off"

    def __post_init__(self) -> None:
        for name in ("initial_bytes", "chunk_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"ArenaConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("granule", "alignment"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1) or v > PAGE_SIZE:
                raise ValueError(f"ArenaConfig.{name} must be a power of two <= {PAGE_SIZE}")
        if self.pin not in ("auto", "required", "off"):
            raise ValueError(
                f"ArenaConfig.pin must be 'auto', 'required' or 'off', not {self.pin!r}"
            )
        if self.huge_pages not in ("auto", "required", "off"):
            raise ValueError(
                "ArenaConfig.huge_pages must be 'auto', 'required' or 'off', "
                f"not {self.huge_pages!r}"
            )


@dataclass(frozen=True)
class HugePageReport:
    """mode: the config's; huge_bytes: chunk bytes verified backed by huge pages;
    rounding_bytes: bytes mapped beyond the page-rounded chunk sizes to make whole huge pages."""

    mode: HugePageMode
    huge_bytes: int
    rounding_bytes: int


@dataclass(frozen=True)
class ArenaBlock:
    """A block of the arena: ``nbytes`` requested at ``offset`` of chunk ``chunk``."""

    chunk: int
    offset: int
    nbytes: int
    reserved: int
    ptr: int


@dataclass
class _Chunk:
    buffer: HostBuffer
    alloc: FreeListAllocator
    rounding: int = 0  # bytes added to make whole huge pages


class PinnedArena:
    """Chunks of pinned, page-aligned host memory under best-fit free-list allocators."""

    def __init__(
        self,
        config: ArenaConfig | None = None,
        prepare: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config or ArenaConfig()
        self._prepare = prepare
        self._chunks: dict[int, _Chunk] = {}
        self._next_chunk = 0
        self._requested = 0
        self._lock = threading.Lock()
        self._released: list[ArenaBlock] = []  # given back by release(), not yet freed
        with _LIVE_LOCK:
            _LIVE.add(self)
        if self.config.initial_bytes:
            size = round_up(self.config.initial_bytes, PAGE_SIZE)
            self._add_chunk(size, self.config.initial_bytes)

    def _add_chunk(self, nbytes: int, request: int) -> int:
        mode, rounding = self.config.huge_pages, 0
        if mode != "off" and thp_mode() in ("always", "madvise"):
            rounding = round_up(nbytes, huge_page_size()) - nbytes
        size = nbytes + rounding
        try:
            buf = HostBuffer(size, pin=self.config.pin, prepare=self._prepare, huge_pages=mode)
        except HostMapError as err:  # nothing changed: the arena is as it was
            raise self._grow_failed(err, size, request) from err
        idx = self._next_chunk
        self._next_chunk += 1
        alloc = FreeListAllocator(size, granule=self.config.granule)
        self._chunks[idx] = _Chunk(buf, alloc, rounding)
        return idx

    def _grow_failed(self, err: HostMapError, size: int, request: int) -> OSError:
        """The error of a chunk that could not be mapped: the sizes, what the arena already
        holds and the ways out (errno kept)."""
        held = self._figures()
        return OSError(
            err.errno,
            f"memopt pinned arena: cannot add a chunk of {size} bytes for a request of "
            f"{request} bytes (ArenaConfig.chunk_bytes={self.config.chunk_bytes}): {err.strerror}. "
            f"The arena already maps {held.capacity_bytes} bytes in {len(self._chunks)} chunks "
            f"({held.requested_bytes} requested by live blocks). Ways out: an arena with a "
            "smaller ArenaConfig.chunk_bytes (0: exactly each request), e.g. "
            "memopt.activations.apply(..., arena=PinnedArena(ArenaConfig(chunk_bytes=0))); "
            "for activation swapping, swap fewer blocks to the CPU or use swap('nvme'); or "
            "raise the memory limit named above",
        )

    def _figures(self) -> TierReport:
        """report()'s figures (lock held)."""
        stats = [c.alloc.stats() for c in self._chunks.values()]
        pinned = sum(c.buffer.nbytes for c in self._chunks.values() if c.buffer.pinned != "none")
        return TierReport(
            requested_bytes=self._requested,
            reserved_bytes=sum(s.reserved for s in stats),
            pinned_bytes=pinned,
            capacity_bytes=sum(s.capacity for s in stats),
            live_handles=sum(s.allocated_blocks for s in stats),
        )

    def alloc(self, nbytes: int, alignment: int | None = None) -> ArenaBlock:
        """A block of ``nbytes`` aligned to ``alignment`` (default: the config's)."""
        align = max(alignment or self.config.alignment, self.config.granule)
        if align > PAGE_SIZE:
            raise ValueError(f"alignment {align} > page size {PAGE_SIZE} is not supported")
        with self._lock:
            self._drain()
            for idx, chunk in self._chunks.items():
                off = chunk.alloc.allocate(nbytes, align)
                if off is not None:
                    return self._block(idx, off, nbytes)
            size = max(self.config.chunk_bytes, round_up(max(nbytes, 1), PAGE_SIZE))
            idx = self._add_chunk(round_up(size, PAGE_SIZE), nbytes)
            off = self._chunks[idx].alloc.allocate(nbytes, align)
            assert off is not None, "a fresh chunk must fit its request"
            return self._block(idx, off, nbytes)

    def _block(self, idx: int, off: int, nbytes: int) -> ArenaBlock:
        chunk = self._chunks[idx]
        self._requested += nbytes
        reserved = chunk.alloc.size_of(off)
        return ArenaBlock(idx, off, nbytes, reserved, chunk.buffer.ptr + off)

    def free(self, block: ArenaBlock) -> None:
        with self._lock:
            self._drain()
            self._chunks[block.chunk].alloc.free(block.offset)
            self._requested -= block.nbytes

    def release(self, blocks: Iterable[ArenaBlock]) -> None:
        """Free ``blocks`` from a finalizer: never waits for the lock. A garbage collection
        may run a finalizer in the middle of another arena call on the same thread, lock
        held and the allocator half-updated; so the blocks are freed now when the lock is
        free, else by the next arena call (``report()`` included)."""
        self._released.extend(blocks)
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Free the blocks ``release`` queued (lock held)."""
        while self._released:
            block = self._released.pop()
            chunk = self._chunks.get(block.chunk)
            if chunk is not None:  # a closed arena has forgotten its chunks
                chunk.alloc.free(block.offset)
                self._requested -= block.nbytes

    def bytes_view(self, block: ArenaBlock) -> torch.Tensor:
        """The block's bytes as a ``uint8`` tensor (a view, no copy)."""
        base = self._chunks[block.chunk].buffer.tensor
        return base[block.offset : block.offset + block.nbytes]

    def tensor(
        self,
        block: ArenaBlock,
        dtype: torch.dtype = torch.uint8,
        shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """A typed view of the block: ``dtype`` and ``shape`` must cover exactly its bytes."""
        raw = self.bytes_view(block)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if block.nbytes % itemsize or block.offset % itemsize:
            raise ValueError(f"block of {block.nbytes} bytes cannot be viewed as {dtype}")
        typed = raw.view(dtype)
        if shape is None:
            return typed
        if math.prod(shape) != typed.numel():
            raise ValueError(
                f"shape {tuple(shape)} has {math.prod(shape)} elements, the block holds "
                f"{typed.numel()} of {dtype}"
            )
        return typed.view(tuple(shape))

    def trim(self) -> int:
        """Unpin and drop chunks with no blocks; returns the bytes given back."""
        freed = 0
        with self._lock:
            self._drain()
            for idx in [i for i, c in self._chunks.items() if not c.alloc.stats().allocated_blocks]:
                chunk = self._chunks.pop(idx)
                chunk.buffer.release()
                freed += chunk.buffer.nbytes
        return freed

    def report(self) -> TierReport:
        with self._lock:
            self._drain()
            return self._figures()

    def huge_pages(self) -> HugePageReport:
        """Huge-page backing of the live chunks and the bytes their rounding added."""
        with self._lock:
            chunks = list(self._chunks.values())
            huge = sum(c.buffer.huge_bytes for c in chunks)
            return HugePageReport(self.config.huge_pages, huge, sum(c.rounding for c in chunks))

    def chunk_count(self) -> int:
        return len(self._chunks)

    def close(self) -> None:
        """Unpin every chunk and forget them (views still held keep their mapping alive)."""
        with self._lock:
            for chunk in self._chunks.values():
                chunk.buffer.release()
            self._chunks.clear()
            self._released.clear()
            self._requested = 0


_DEFAULT: PinnedArena | None = None
_DEFAULT_LOCK = threading.Lock()

# Fork safety: a child gets a copy of every lock in the state it had at the fork. Had another
# thread been inside an arena call then, the child's copy would stay locked forever (and the
# allocator half-updated). So the fork waits for those calls: every arena lock is taken just
# before it and released on both sides after.
_LIVE: weakref.WeakSet[PinnedArena] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_HELD: list[PinnedArena] = []


def _before_fork() -> None:
    _DEFAULT_LOCK.acquire()
    _LIVE_LOCK.acquire()
    _HELD[:] = list(_LIVE)
    for arena in _HELD:
        arena._lock.acquire()


def _after_fork() -> None:
    for arena in _HELD:
        arena._lock.release()
    _HELD.clear()
    _LIVE_LOCK.release()
    _DEFAULT_LOCK.release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork
)


def default_arena() -> PinnedArena:
    """The process-wide arena the tiers share unless given their own (the NVMe tier's bounce
    blocks, the offloaded optimizer's pinned buffers): on transparent huge pages when THP
    allows ("auto": 1 MiB O_DIRECT requests stay one request instead of being split; measured
    in docs/benchmarks.md), 256 MiB chunks so the 2 MiB rounding is negligible."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = PinnedArena(ArenaConfig(huge_pages="auto"))
        return _DEFAULT
