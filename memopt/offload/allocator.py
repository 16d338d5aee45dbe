"""Best-fit free-list allocator over one linear range of bytes (bookkeeping only, no memory).

The range ``[0, capacity)`` is split into allocated blocks and free blocks. A request of
``n`` bytes reserves ``round_up(n, granule)`` bytes (``granule`` is 64 by default: exact size
up to a cache line, never a power-of-two class) at an offset that is a multiple of the
requested ``alignment``. The allocator picks the **best fit**: the free block that leaves the
least room over once its leading alignment pad is cut off; the pad and the tail go back to the
free list. Freeing a block merges it with a free left and/or right neighbour (coalescing), so
freeing everything always leaves one free block of the whole capacity. ``extend`` appends
room at the end (merged with a trailing free block).

Free blocks are kept sorted by offset (``bisect``): best fit is a linear scan over the free
list (there are few free blocks when blocks are reused; O(free blocks) per request), freeing is
O(log n) to find the neighbours. Used by the pinned arena (one allocator per chunk) and by the
NVMe tier (offsets inside its one preallocated file).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class AllocatorStats:
    capacity: int
    reserved: int  # bytes in allocated blocks
    free: int
    largest_free: int
    free_blocks: int
    allocated_blocks: int

    @property
    def fragmentation(self) -> float:
        """1 - largest free block / all free bytes (0 when the free room is one block)."""
        return 0.0 if self.free == 0 else 1.0 - self.largest_free / self.free


class FreeListAllocator:
    """Best-fit, coalescing allocator of offsets inside ``[0, capacity)``."""

    def __init__(self, capacity: int = 0, granule: int = 64) -> None:
        if granule <= 0 or granule & (granule - 1):
            raise ValueError(f"granule must be a power of two, got {granule}")
        if capacity < 0 or capacity % granule:
            raise ValueError(f"capacity {capacity} must be >= 0 and a multiple of {granule}")
        self.granule = granule
        self.capacity = 0
        self._free_offsets: list[int] = []  # sorted
        self._free_size: dict[int, int] = {}
        self._allocated: dict[int, int] = {}
        self.extend(capacity)

    def extend(self, nbytes: int) -> None:
        """Append ``nbytes`` (a multiple of the granule) of free room at the end."""
        if nbytes % self.granule:
            raise ValueError(f"extend({nbytes}): not a multiple of the granule {self.granule}")
        if nbytes == 0:
            return
        start = self.capacity
        self.capacity += nbytes
        self._insert_free(start, nbytes)

    def allocate(self, nbytes: int, alignment: int | None = None) -> int | None:
        """Offset of a new block of ``nbytes`` aligned to ``alignment``, or None if none fits."""
        align = max(alignment or self.granule, self.granule)
        if align & (align - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        size = round_up(max(nbytes, 1), self.granule)
        best: tuple[int, int, int] | None = None  # (leftover, block offset, aligned offset)
        for off in self._free_offsets:
            block = self._free_size[off]
            start = round_up(off, align)
            leftover = block - (start - off) - size
            if leftover >= 0 and (best is None or leftover < best[0]):
                best = (leftover, off, start)
                if leftover == 0:
                    break
        if best is None:
            return None
        leftover, off, start = best
        self._remove_free(off)
        if start > off:
            self._insert_free(off, start - off, merge=False)
        if leftover:
            self._insert_free(start + size, leftover, merge=False)
        self._allocated[start] = size
        return start

    def free(self, offset: int) -> int:
        """Give back the block at ``offset``; returns its size. Merges free neighbours."""
        try:
            size = self._allocated.pop(offset)
        except KeyError:
            raise ValueError(f"free({offset}): no block allocated at that offset") from None
        self._insert_free(offset, size)
        return size

    def size_of(self, offset: int) -> int:
        return self._allocated[offset]

    def stats(self) -> AllocatorStats:
        free = sum(self._free_size.values())
        return AllocatorStats(
            capacity=self.capacity,
            reserved=sum(self._allocated.values()),
            free=free,
            largest_free=max(self._free_size.values(), default=0),
            free_blocks=len(self._free_offsets),
            allocated_blocks=len(self._allocated),
        )

    def free_blocks(self) -> list[tuple[int, int]]:
        """(offset, size) of each free block, by offset (for tests and reports)."""
        return [(off, self._free_size[off]) for off in self._free_offsets]

    # --- free-list maintenance -----------------------------------------------------------

    def _remove_free(self, offset: int) -> int:
        idx = bisect.bisect_left(self._free_offsets, offset)
        assert self._free_offsets[idx] == offset
        del self._free_offsets[idx]
        return self._free_size.pop(offset)

    def _insert_free(self, offset: int, size: int, merge: bool = True) -> None:
        idx = bisect.bisect_left(self._free_offsets, offset)
        if merge and idx < len(self._free_offsets):
            right = self._free_offsets[idx]
            if offset + size == right:  # merge with the right neighbour
                size += self._free_size.pop(right)
                del self._free_offsets[idx]
        if merge and idx > 0:
            left = self._free_offsets[idx - 1]
            if left + self._free_size[left] == offset:  # merge into the left neighbour
                self._free_size[left] += size
                return
        self._free_offsets.insert(idx, offset)
        self._free_size[offset] = size
