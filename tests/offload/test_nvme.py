"""NVMe tier: round trips, async overlap, offset table reuse, and the error paths."""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from memopt._utils.logging import _reset_warn_once
from memopt.offload import io_backend, nvme_file
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.io_backend import IOBackend, ThreadPoolBackend
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.tier import wait_all

CASES = [
    ((1024,), torch.float32),  # exactly one page: fully in place when aligned
    ((3, 333), torch.bfloat16),  # not a page multiple: bounce for the tail
    ((300_001,), torch.float16),  # several 64 KiB blocks plus a tail
    ((7, 11, 13), torch.int32),
    ((1,), torch.float64),
    ((0,), torch.float32),
]


def _config(tmp_path: Path, **kw: object) -> NVMeConfig:
    base = dict(directory=tmp_path, capacity_bytes=4 << 20, block_size=64 << 10, queue_depth=4)
    base.update(kw)
    return NVMeConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _thread_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # These tests inject faults into the thread backend's os calls; the native backend has
    # its own tests (test_native_aio.py).
    monkeypatch.setenv("MEMOPT_AIO", "threads")


@pytest.fixture
def arena() -> PinnedArena:
    a = PinnedArena(ArenaConfig(chunk_bytes=4 << 20, pin="off"))
    yield a
    a.close()


@pytest.fixture
def tier(tmp_path: Path, arena: PinnedArena) -> NVMeTier:
    t = NVMeTier(_config(tmp_path), arena=arena)
    yield t
    t.close()


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_round_trip(
    tier: NVMeTier, arena: PinnedArena, shape: tuple[int, ...], dtype: torch.dtype, aligned: bool
) -> None:
    assert tier.direct and isinstance(tier.backend, IOBackend)
    src = (torch.randn(shape) * 100).to(dtype)
    h = tier.allocate(shape, dtype)
    nbytes = h.nbytes
    if aligned:  # arena tensors: in place (page-aligned address)
        blk = arena.alloc(nbytes, alignment=4096)
        staged = arena.tensor(blk, dtype, shape)
        staged.copy_(src)
        tier.write_async(h, staged).wait()
    else:  # an ordinary tensor (a slice at an odd offset): through a bounce block
        staged = torch.empty(src.numel() + 1, dtype=dtype)[1:].view(shape)
        staged.copy_(src)
        tier.write_async(h, staged).wait()
    out = torch.full(shape, 7, dtype=dtype)
    tier.read_async(h, out).wait()
    assert torch.equal(out, src)
    assert tier.report().pinned_bytes == 0  # bounce blocks were returned
    tier.free(h)
    assert tier.report().reserved_bytes == 0 and tier.report().live_handles == 0


def test_one_file_offset_table_and_reuse(tier: NVMeTier, tmp_path: Path) -> None:
    assert [p.name for p in tmp_path.iterdir()] == ["memopt-rank0.swap"]
    hs = [tier.allocate(100_000) for _ in range(8)]
    rep = tier.report()
    assert rep.requested_bytes == 800_000 and rep.reserved_bytes == 8 * 102_400
    for h in hs:
        tier.free(h)
    assert tier._slots.free_blocks() == [(0, 4 << 20)]  # coalesced back into one extent
    assert [p.name for p in tmp_path.iterdir()] == ["memopt-rank0.swap"]


def test_two_tiers_in_one_directory_get_separate_files(tmp_path: Path, arena: PinnedArena) -> None:
    # optimizer state and stage-3 parameter shards may share one nvme_path: the second tier
    # must not truncate the first one's file
    a = NVMeTier(_config(tmp_path), arena=arena)
    b = NVMeTier(_config(tmp_path), arena=arena)
    try:
        assert {a.file.path.name, b.file.path.name} == {"memopt-rank0.swap", "memopt-rank0-1.swap"}
        ha, hb = a.allocate((1024,), torch.float32), b.allocate((1024,), torch.float32)
        a.write_async(ha, torch.arange(1024.0)).wait()
        b.write_async(hb, -torch.arange(1024.0)).wait()
        out = torch.empty(1024)
        a.read_async(ha, out).wait()
        assert torch.equal(out, torch.arange(1024.0))
    finally:
        b.close()
        a.close()
    c = NVMeTier(_config(tmp_path), arena=arena)  # both names released on close
    try:
        assert c.file.path.name == "memopt-rank0.swap"
    finally:
        c.close()


def test_finished_io_is_freed_without_the_cycle_collector(tier: NVMeTier) -> None:
    # a finished future must not sit in a reference cycle (its pieces' callbacks point back at
    # it): it and the buffers it kept alive go as soon as the caller drops it
    import gc
    import weakref

    h = tier.allocate((4096,), torch.float32)
    gc.disable()
    try:
        for op in ("write", "read"):
            buf = torch.empty(4097)[1:]  # unaligned: staged through a bounce block
            fut = tier.write_async(h, buf) if op == "write" else tier.read_async(h, buf)
            fut.wait()
            assert fut.keep_alive is None
            ref = weakref.ref(fut)
            del fut
            # The worker thread that finished the last piece may still be returning from the
            # callback (its frame and the piece hold the future for a moment after wait()
            # wakes); a reference cycle, with the collector off, would hold it for good.
            deadline = time.monotonic() + 2.0
            while ref() is not None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert ref() is None, f"a finished {op} future was kept alive by a cycle"
    finally:
        gc.enable()


def test_many_in_flight_overlap(tmp_path: Path, arena: PinnedArena) -> None:
    """Several writes and reads outstanding at once; the backend runs them concurrently."""
    active, peak, lock = 0, 0, threading.Lock()
    real = io_backend._pwrite

    def counting_pwrite(fd: int, buf: memoryview, off: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            threading.Event().wait(0.002)  # hold the slot so overlap is visible
            return real(fd, buf, off)
        finally:
            with lock:
                active -= 1

    io_backend._pwrite = counting_pwrite
    try:
        with NVMeTier(_config(tmp_path, queue_depth=4), arena=arena) as tier:
            srcs = [torch.randn(50_000) for _ in range(6)]
            hs = [tier.allocate(s.shape, s.dtype) for s in srcs]
            futs = [tier.write_async(h, s) for h, s in zip(hs, srcs, strict=True)]
            assert not all(f.done() for f in futs)
            wait_all(futs)
            outs = [torch.empty(50_000) for _ in srcs]
            wait_all([tier.read_async(h, o) for h, o in zip(hs, outs, strict=True)])
            assert all(torch.equal(o, s) for o, s in zip(outs, srcs, strict=True))
    finally:
        io_backend._pwrite = real
    assert peak >= 3, peak


def test_rewrite_commits_latest_and_file_grows(tmp_path: Path, arena: PinnedArena) -> None:
    with NVMeTier(_config(tmp_path, capacity_bytes=1 << 20, grow_bytes=1 << 20), arena=arena) as t:
        h = t.allocate((200_000,), torch.float32)  # 800 KB: the shadow slot forces growth
        for k in range(3):
            t.write_async(h, torch.full((200_000,), float(k))).wait()
        out = torch.empty(200_000)
        t.read_async(h, out).wait()
        assert torch.all(out == 2.0)
        assert t.report().capacity_bytes == 2 << 20 and os.path.getsize(t.file.path) == 2 << 20


def test_failed_write_keeps_previous_content(tier: NVMeTier) -> None:
    h = tier.allocate((100_000,), torch.float32)  # 400 KB: 7 blocks of 64 KiB
    old = torch.arange(100_000, dtype=torch.float32)
    tier.write_async(h, old).wait()
    calls = 0
    real = io_backend._pwrite

    def enospc_half_way(fd: int, buf: memoryview, off: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buf, off)

    io_backend._pwrite = enospc_half_way
    try:
        fut = tier.write_async(h, torch.zeros(100_000))
        with pytest.raises(OSError, match="ENOSPC") as info:
            fut.wait()
    finally:
        io_backend._pwrite = real
    assert info.value.errno == errno.ENOSPC and str(tier.file.path) in str(info.value)
    out = torch.empty(100_000)
    tier.read_async(h, out).wait()
    assert torch.equal(out, old)  # the table still points at the old slot
    assert tier.report().reserved_bytes == 401_408  # the shadow slot was freed


def test_read_eio_reaches_wait(tier: NVMeTier, monkeypatch: pytest.MonkeyPatch) -> None:
    h = tier.allocate(8192)
    tier.write_async(h, torch.ones(8192, dtype=torch.uint8)).wait()

    def eio(fd: int, bufs: list, off: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(io_backend, "_preadv", eio)
    with pytest.raises(OSError, match=r"read of 8192 bytes .*EIO") as info:
        tier.read_async(h, torch.empty(8192, dtype=torch.uint8)).wait()
    assert info.value.errno == errno.EIO


def test_full_file_without_growth_is_enospc(tmp_path: Path, arena: PinnedArena) -> None:
    with NVMeTier(_config(tmp_path, capacity_bytes=1 << 20, grow_bytes=0), arena=arena) as t:
        t.allocate(600_000)
        with pytest.raises(OSError, match="full") as info:
            t.allocate(600_000)
        assert info.value.errno == errno.ENOSPC


def test_capacity_beyond_free_space_is_clear_enospc(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(OSError, match="has .* free") as info:
        NVMeTier(_config(tmp_path, capacity_bytes=(free // 4096 + 1024) * 4096))
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "memopt-rank0.swap").exists()


def _no_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a filesystem that refuses O_DIRECT at open (EINVAL), like old tmpfs."""
    real_open = os.open

    def fake_open(path: object, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, mode)

    monkeypatch.setattr(nvme_file.os, "open", fake_open)


def test_no_o_direct_required_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_o_direct(monkeypatch)
    with pytest.raises(OSError, match="does not support O_DIRECT.*direct='prefer'"):
        NVMeTier(_config(tmp_path))


def test_no_o_direct_prefer_warns_and_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arena: PinnedArena
) -> None:
    _no_o_direct(monkeypatch)
    _reset_warn_once()
    with pytest.warns(UserWarning, match="falling back"):
        tier = NVMeTier(_config(tmp_path, direct="prefer"), arena=arena)
    with tier, warnings.catch_warnings():
        assert not tier.direct
        h = tier.allocate((10,), torch.float32)
        tier.write_async(h, torch.arange(10.0)).wait()
        out = torch.empty(10)
        tier.read_async(h, out).wait()
        assert torch.equal(out, torch.arange(10.0))


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block_size"):
        NVMeConfig(directory=tmp_path, block_size=1000)
    with pytest.raises(ValueError, match="queue_depth"):
        ThreadPoolBackend(queue_depth=0)
    with pytest.raises(ValueError, match="direct"):
        NVMeConfig(directory=tmp_path, direct="maybe")  # type: ignore[arg-type]


def test_read_during_write_sees_the_committed_content(
    tmp_path: Path, arena: PinnedArena, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = NVMeTier(_config(tmp_path, queue_depth=8), arena=arena)  # 4 pieces per write
    h = tier.allocate((50_000,), torch.float32)
    tier.write_async(h, torch.ones(50_000)).wait()
    gate = threading.Event()
    real = io_backend._pwrite

    def gated(fd: int, buf: memoryview, off: int) -> int:
        gate.wait(10)
        return real(fd, buf, off)

    monkeypatch.setattr(io_backend, "_pwrite", gated)
    write = tier.write_async(h, torch.full((50_000,), 2.0))
    out = torch.empty(50_000)
    tier.read_async(h, out).wait()  # the write is still held at the gate
    assert not write.done() and torch.all(out == 1.0)
    gate.set()
    write.wait()
    tier.read_async(h, out).wait()
    assert torch.all(out == 2.0)
    tier.close()


def test_tier_dropped_without_close_removes_its_file(tmp_path: Path, arena: PinnedArena) -> None:
    """The swap file is preallocated scratch space: a tier garbage-collected without close()
    (the docs' examples never call it) removes it, and frees its name for the next tier."""
    import gc

    t = NVMeTier(_config(tmp_path), arena=arena)
    h = t.allocate(4096)
    wait_all([t.write_async(h, torch.arange(1024, dtype=torch.float32))])
    path = t.file.path
    assert path.exists()
    del t, h
    gc.collect()
    assert not path.exists()
    again = NVMeTier(_config(tmp_path), arena=arena)  # the same name is free again
    assert again.file.path == path
    again.close()
    assert not path.exists()
    kept = NVMeTier(_config(tmp_path, keep_file=True), arena=arena)
    kept_path = kept.file.path
    del kept
    gc.collect()
    assert kept_path.exists()  # keep_file=True: left for the user


def test_sharded_optimizer_close_removes_the_state_file(tmp_path: Path) -> None:
    import memopt
    from memopt.offload import OffloadConfig

    model = torch.nn.Linear(64, 64)
    model, opt = memopt.shard(
        model, torch.optim.AdamW(model.parameters()), stage=2,
        offload=OffloadConfig("nvme", nvme_path=str(tmp_path)),
    )  # fmt: skip
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    assert any(p.suffix == ".swap" for p in tmp_path.iterdir())
    opt.close()
    assert not any(p.suffix == ".swap" for p in tmp_path.iterdir())


def test_failed_offloaded_step_says_not_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of an offloaded step: the error says the step did not complete
    and the run must be reloaded from a checkpoint (some parameters were already written)."""
    from memopt.offload import OffloadConfig, OffloadedAdamW

    monkeypatch.setenv("MEMOPT_AIO", "threads")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    nvme = NVMeConfig(directory=tmp_path, block_size=4096)
    opt = OffloadedAdamW(model.parameters(), lr=1e-2,
                         offload=OffloadConfig("nvme", nvme=nvme, bucket_bytes=8192))  # fmt: skip
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    real, calls = io_backend._pwrite, [0]

    def enospc(fd: int, buf: memoryview, off: int) -> int:
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buf, off)

    monkeypatch.setattr(io_backend, "_pwrite", enospc)
    model(torch.randn(4, 64)).square().mean().backward()
    with pytest.raises(OSError) as info:
        opt.step()
    assert info.value.errno == errno.ENOSPC
    assert "Do not retry" in str(info.value)
    monkeypatch.setattr(io_backend, "_pwrite", real)
    opt.close()


def test_read_into_an_inference_tensor(tier: NVMeTier, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read started under torch.inference_mode() (a stage-3 unit loaded during an
    inference-mode forward): the bounce copy runs on an I/O thread, outside that mode, and
    failed with 'Inplace update to inference tensor outside InferenceMode'."""
    src = torch.arange(333, dtype=torch.float32)
    h = tier.allocate(src.shape, src.dtype)
    tier.write_async(h, src).wait()
    gate = threading.Event()  # hold the read until read_async returned: the copy is threaded
    real = io_backend._preadv

    def held(fd: int, bufs: list, off: int) -> int:
        gate.wait(10)
        return real(fd, bufs, off)

    monkeypatch.setattr(io_backend, "_preadv", held)
    with torch.inference_mode():
        out = torch.zeros(334)[1:]  # unaligned: all of it goes through a bounce block
        fut = tier.read_async(h, out)
    gate.set()
    fut.wait()
    assert torch.equal(out, src)
    tier.free(h)
