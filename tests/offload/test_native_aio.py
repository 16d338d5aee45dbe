"""Native Linux AIO backend: tier round trips with each backend, errors, many in flight.

Set MEMOPT_REQUIRE_NATIVE=1 to make a missing native build fail instead of skip.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from memopt.offload import native_aio
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.io_backend import IOBackend, ThreadPoolBackend
from memopt.offload.native_aio import NativeAIOBackend, make_backend, native_available
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.tier import IOFuture, wait_all
from tests.offload.conftest import require_native


@pytest.fixture
def arena() -> PinnedArena:
    a = PinnedArena(ArenaConfig(chunk_bytes=8 << 20, pin="off"))
    yield a
    a.close()


def _config(tmp_path: Path, **kw: object) -> NVMeConfig:
    base = dict(directory=tmp_path, capacity_bytes=8 << 20, block_size=64 << 10, queue_depth=4)
    base.update(kw)
    return NVMeConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1024,), torch.float32),
        ((300_001,), torch.float16),
        ((3, 333), torch.bfloat16),
        ((0,), torch.float32),
    ],
)
def test_tier_round_trip(kind: str, tmp_path: Path, arena: PinnedArena, shape, dtype) -> None:
    with NVMeTier(_config(tmp_path), arena=arena) as tier:
        assert tier.backend.name == kind and isinstance(tier.backend, IOBackend)
        src = (torch.randn(shape) * 100).to(dtype)
        h = tier.allocate(shape, dtype)
        aligned = arena.tensor(arena.alloc(max(h.nbytes, 1), alignment=4096))[: h.nbytes]
        aligned.copy_(src.reshape(-1).view(torch.uint8))
        tier.write_async(h, aligned.view(dtype).reshape(shape)).wait()
        back = torch.empty(shape, dtype=dtype)  # unaligned: goes through a bounce block
        tier.read_async(h, back).wait()
        assert torch.equal(back.view(torch.uint8), src.view(torch.uint8))
        # overwrite, read into an aligned buffer
        src2 = src + 1
        tier.write_async(h, src2).wait()
        aligned.zero_()
        tier.read_async(h, aligned.view(dtype).reshape(shape)).wait()
        assert torch.equal(aligned.view(dtype).reshape(shape), src2)


def test_many_in_flight(kind: str, tmp_path: Path, arena: PinnedArena) -> None:
    """64 handles x 4 pieces each, all submitted before any wait, at queue depth 4."""
    with NVMeTier(_config(tmp_path, capacity_bytes=32 << 20), arena=arena) as tier:
        handles = [tier.allocate(256 << 10) for _ in range(64)]
        bufs = [arena.tensor(arena.alloc(256 << 10, alignment=4096)) for _ in handles]
        for i, b in enumerate(bufs):
            b.fill_(i % 251)
        wait_all([tier.write_async(h, b) for h, b in zip(handles, bufs, strict=True)])
        for b in bufs:
            b.zero_()
        wait_all([tier.read_async(h, b) for h, b in zip(handles, bufs, strict=True)])
        for i, b in enumerate(bufs):
            assert int(b.min()) == int(b.max()) == i % 251


def _backend(kind: str) -> IOBackend:
    return NativeAIOBackend(8, 4096) if kind == "native" else ThreadPoolBackend(8, 4096)


def test_read_past_eof_is_eio(kind: str, tmp_path: Path, arena: PinnedArena) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    backend = _backend(kind)
    buf = arena.alloc(8192, alignment=4096)
    try:
        fut = IOFuture(backend.submit("read", fd, buf.ptr, 8192, 4096, "eof test"), "eof")
        with pytest.raises(OSError) as info:
            fut.wait(10)
        assert info.value.errno == errno.EIO and "eof test" in str(info.value)
        # a read that ends exactly at EOF is fine, and the data arrive
        IOFuture(backend.submit("read", fd, buf.ptr, 4096, 0, "ok"), "ok").wait(10)
        assert bytes(arena.bytes_view(buf)[:4096].numpy()) == b"x" * 4096
    finally:
        backend.close()
        os.close(fd)


def test_bad_fd_is_ebadf(kind: str, arena: PinnedArena) -> None:
    backend = _backend(kind)
    buf = arena.alloc(8192, alignment=4096)
    try:
        for op in ("read", "write"):
            fut = IOFuture(backend.submit(op, 987654, buf.ptr, 8192, 0, "bad fd"), "bad fd")
            with pytest.raises(OSError) as info:
                fut.wait(10)
            assert info.value.errno == errno.EBADF and f"{op} of 4096 bytes" in str(info.value)
    finally:
        backend.close()


def test_read_only_fd_write_fails(kind: str, tmp_path: Path, arena: PinnedArena) -> None:
    path = tmp_path / "ro.bin"
    path.write_bytes(b"\0" * 8192)
    fd = os.open(path, os.O_RDONLY)
    backend = _backend(kind)
    buf = arena.alloc(4096, alignment=4096)
    try:
        fut = IOFuture(backend.submit("write", fd, buf.ptr, 4096, 0, "ro"), "ro")
        with pytest.raises(OSError) as info:
            fut.wait(10)
        assert info.value.errno == errno.EBADF
    finally:
        backend.close()
        os.close(fd)


def test_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMOPT_AIO", "threads")
    b = make_backend(4, 4096)
    assert isinstance(b, ThreadPoolBackend)
    b.close()
    monkeypatch.setenv("MEMOPT_AIO", "bogus")
    with pytest.raises(ValueError, match="MEMOPT_AIO"):
        make_backend(4, 4096)
    monkeypatch.delenv("MEMOPT_AIO")
    b = make_backend(4, 4096)
    assert b.name == ("native" if native_available() else "threads")
    b.close()


def test_absent_library_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_aio, "_lib", None)
    monkeypatch.setattr(native_aio, "_loaded", True)
    monkeypatch.delenv("MEMOPT_AIO", raising=False)
    b = make_backend(4, 4096)
    assert isinstance(b, ThreadPoolBackend)
    b.close()
    with pytest.raises(RuntimeError, match="not built"):
        make_backend(4, 4096, kind="native")


def test_native_status_reported() -> None:
    require_native()
    from memopt._utils.native import native_status

    assert native_status().get("_aio_lib") == "loaded"


def test_buffered_file_gets_threads(tmp_path: Path, arena: PinnedArena, monkeypatch) -> None:
    monkeypatch.delenv("MEMOPT_AIO", raising=False)
    with NVMeTier(_config(tmp_path, direct="off"), arena=arena) as tier:
        assert tier.backend.name == "threads"
    backend = make_backend(4, 4096, direct=False)
    assert backend.name == "threads"
    backend.close()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_engine_cuts_requests_and_round_trips(tmp_path: Path, arena: PinnedArena, workers) -> None:
    """A request of 10.5 blocks is cut by the engines (one future per engine part, not one per
    block) and round-trips, at a queue depth below the piece count."""
    require_native()
    path = tmp_path / "cut.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    backend = NativeAIOBackend(queue_depth=3, block_size=8192, workers=workers)
    nbytes = 8192 * 10 + 4096
    src = arena.tensor(arena.alloc(nbytes, alignment=4096))
    dst = arena.tensor(arena.alloc(nbytes, alignment=4096))
    src.copy_(torch.randint(0, 255, (nbytes,), dtype=torch.uint8))
    try:
        futures = backend.submit("write", fd, src.data_ptr(), nbytes, 4096, "cut")
        assert len(futures) == min(workers, 3)
        IOFuture(futures, "cut write").wait(10)
        # one-block requests go to the engines in turn; all land
        small = [backend.submit("read", fd, dst.data_ptr() + o, 4096, 4096 + o, "small")
                 for o in range(0, nbytes, 4096)]  # fmt: skip
        assert all(len(f) == 1 for f in small)
        wait_all([IOFuture(f, "small read") for f in small])
        assert torch.equal(dst, src)
        assert os.path.getsize(path) == 4096 + nbytes
    finally:
        backend.close()
        os.close(fd)


def test_failed_piece_is_named_in_the_error(tmp_path: Path, arena: PinnedArena) -> None:
    """A 4-block read whose last block lies past the end of the file fails with EIO naming that
    block's offset and length, and the engine keeps serving later requests."""
    require_native()
    path = tmp_path / "short.bin"
    path.write_bytes(b"y" * 3 * 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    backend = NativeAIOBackend(queue_depth=2, block_size=4096, workers=1)
    buf = arena.alloc(4 * 4096, alignment=4096)
    try:
        fut = IOFuture(backend.submit("read", fd, buf.ptr, 4 * 4096, 0, "past eof"), "eof")
        with pytest.raises(OSError, match=r"past eof: read of 4096 bytes at file offset 12288"):
            fut.wait(10)
        IOFuture(backend.submit("read", fd, buf.ptr, 3 * 4096, 0, "ok"), "ok").wait(10)
        assert bytes(arena.bytes_view(buf)[: 3 * 4096].numpy()) == b"y" * 3 * 4096
    finally:
        backend.close()
        os.close(fd)


def test_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native()
    monkeypatch.delenv("MEMOPT_AIO_WORKERS", raising=False)
    assert native_aio.default_workers() == 1
    monkeypatch.setenv("MEMOPT_AIO_WORKERS", "3")
    assert native_aio.default_workers() == 3
    b = NativeAIOBackend(queue_depth=2, block_size=4096)
    assert b.workers == 2  # never more engines than the queue depth
    b.close()
    monkeypatch.setenv("MEMOPT_AIO_WORKERS", "zero")
    with pytest.raises(ValueError, match="MEMOPT_AIO_WORKERS"):
        native_aio.default_workers()
    with pytest.raises(ValueError, match="workers"):
        NativeAIOBackend(queue_depth=2, block_size=4096, workers=0)
