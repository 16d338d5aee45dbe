"""FreeListAllocator and PinnedArena: best fit, coalescing, exact-size accounting, growth."""

from __future__ import annotations

import random

import pytest
import torch

from memopt.offload.allocator import FreeListAllocator
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.hostmem import PAGE_SIZE


def test_exact_size_accounting_no_pow2_rounding() -> None:
    a = FreeListAllocator(1 << 20, granule=64)
    offs = [a.allocate(n) for n in (1000, 3000, 65)]
    assert offs == [0, 1024, 4032]  # 1000 -> 1024, 3000 -> 3008, 65 -> 128: granule only
    assert a.stats().reserved == 1024 + 3008 + 128
    big = a.allocate(600_000)  # a power-of-two pool would reserve 1 MiB (and not fit)
    assert big is not None and a.size_of(big) == 600_000


def test_alignment_and_pad_reuse() -> None:
    a = FreeListAllocator(64 * 1024, granule=64)
    assert a.allocate(100) == 0
    off = a.allocate(4096, alignment=4096)
    assert off == 4096
    # the pad [128, 4096) went back to the free list and serves a small request
    assert a.allocate(1000) == 128
    with pytest.raises(ValueError, match="power of two"):
        a.allocate(10, alignment=3000)


def test_best_fit_picks_the_tightest_hole() -> None:
    a = FreeListAllocator(10_240, granule=64)
    blocks = [a.allocate(n) for n in (1024, 512, 1024, 256, 1024)]
    a.free(blocks[1])  # hole of 512 at 1024
    a.free(blocks[3])  # hole of 256 at 2560
    assert a.allocate(200) == blocks[3]  # best fit: the 256 hole, not the first (512) one
    assert a.allocate(500) == blocks[1]


def test_coalescing_restores_one_block() -> None:
    a = FreeListAllocator(1 << 20, granule=64)
    rng = random.Random(0)
    offs = [a.allocate(rng.randrange(1, 20_000)) for _ in range(40)]
    assert all(o is not None for o in offs)
    for i in [*range(0, 40, 2), *range(1, 40, 2)]:  # free every other, then the rest
        a.free(offs[i])
    assert a.free_blocks() == [(0, 1 << 20)]
    assert a.stats().fragmentation == 0.0 and a.stats().reserved == 0


def test_fragmentation_then_reuse() -> None:
    a = FreeListAllocator(64 * 1024, granule=64)
    offs = [a.allocate(4096) for _ in range(16)]
    assert a.allocate(1) is None  # full
    for o in offs[::2]:
        a.free(o)
    st = a.stats()
    assert st.free == 8 * 4096 and st.largest_free == 4096 and st.fragmentation > 0.8
    assert a.allocate(8192) is None  # no hole is big enough
    a.free(offs[1])  # joins holes 0, 1, 2 into 12 KiB
    assert a.allocate(8192) == 0


def test_free_errors_and_extend() -> None:
    a = FreeListAllocator(4096, granule=64)
    with pytest.raises(ValueError, match="no block allocated"):
        a.free(64)
    assert a.allocate(4096) == 0 and a.allocate(64) is None
    a.extend(4096)
    assert a.allocate(4096) == 4096


def test_arena_views_report_and_growth() -> None:
    arena = PinnedArena(ArenaConfig(initial_bytes=64 * 1024, chunk_bytes=0, pin="off"))
    b1 = arena.alloc(3 * 1000 * 4)  # fp32 [3, 1000]
    b2 = arena.alloc(4096, alignment=4096)
    t = arena.tensor(b1, torch.float32, (3, 1000))
    t.copy_(torch.arange(3000, dtype=torch.float32).view(3, 1000))
    assert b2.ptr % 4096 == 0 and arena.tensor(b1, torch.float32).sum() == t.sum()
    rep = arena.report()
    assert rep.requested_bytes == 12_000 + 4096 and rep.capacity_bytes == 64 * 1024
    assert rep.reserved_bytes == 12_032 + 4096 and rep.pinned_bytes == 0
    big = arena.alloc(100_000)  # does not fit: grows by exactly the page-rounded request
    assert arena.chunk_count() == 2
    assert arena.report().capacity_bytes == 64 * 1024 + -(-100_000 // PAGE_SIZE) * PAGE_SIZE
    arena.free(big)
    assert arena.trim() > 0 and arena.chunk_count() == 1
    with pytest.raises(ValueError, match="elements"):
        arena.tensor(b1, torch.float32, (2, 1000))
    arena.free(b1)
    arena.free(b2)
    assert arena.report().requested_bytes == 0 and arena.report().reserved_bytes == 0


def test_arena_config_validation() -> None:
    with pytest.raises(ValueError, match="power of two"):
        ArenaConfig(alignment=100)
    with pytest.raises(ValueError, match="pin"):
        ArenaConfig(pin="yes")  # type: ignore[arg-type]
