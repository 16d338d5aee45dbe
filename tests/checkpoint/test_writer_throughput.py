"""The checkpoint writer (writer.py): bytes, preallocation, writes in flight, failures, timing.

The speed itself is measured by benchmarks/ckpt_stall_bench.py against fio; these tests pin
down what makes it fast and safe: the file is preallocated before the direct writes, several
writes are in flight at once, the writer never writes a chunk before it is staged, a failed
write waits for every piece still in flight before returning, rotation deletes old snapshots
off the save's path, and the stats carry the timestamps both throughput figures need.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib

import pytest
import torch

from memopt.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    checksum,
    fileformat,
    publish,
    writer,
)
from memopt.checkpoint.pipeline import Job, Pipeline
from memopt.offload import io_backend, native_aio

PAGE = 4096
ENGINES = ["threads"] + (["native"] if native_aio.native_available() else [])


def _payload(nbytes: int) -> torch.Tensor:
    """Page-aligned uint8 data (a PinnedArena block, like the staging the writer gets)."""
    g = torch.Generator().manual_seed(nbytes)
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    off = (-raw.data_ptr()) % PAGE
    data = raw[off : off + nbytes]
    data.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g))
    return data


@pytest.fixture
def small_chunks(monkeypatch):
    """64 KiB chunks, so a ~1 MiB file is many pieces with several in flight."""
    monkeypatch.setattr(writer, "CHUNK", 64 << 10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("direct", [True, False])
def test_bytes_and_checksum(tmp_path, monkeypatch, small_chunks, engine, direct) -> None:
    monkeypatch.setenv("MEMOPT_AIO", engine)
    header = b"h" * PAGE
    data = _payload(17 * (64 << 10) + 3 * PAGE)  # not a whole number of chunks
    ready_calls: list[int] = []
    path = str(tmp_path / "f")
    crc = writer.write_data_file(path, header, data, "crc32", True, direct, ready_calls.append)
    raw = open(path, "rb").read()
    assert raw == header + data.numpy().tobytes()
    assert crc == zlib.crc32(raw)
    assert ready_calls == sorted(ready_calls) and ready_calls[-1] == data.numel()
    assert len(ready_calls) == 18  # one wait per chunk, before it is submitted


def test_preallocates_only_direct_files(tmp_path, monkeypatch, small_chunks) -> None:
    calls: list[tuple[int, int]] = []
    real = writer._fallocate
    monkeypatch.setattr(
        writer, "_fallocate", lambda fd, o, n: (calls.append((o, n)), real(fd, o, n))
    )
    header, data = b"x" * PAGE, _payload(5 * PAGE)
    writer.write_data_file(str(tmp_path / "d"), header, data, "crc32", False, True)
    writer.write_data_file(str(tmp_path / "b"), header, data, "crc32", False, False)
    if not _direct_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    assert calls == [(0, 6 * PAGE)]  # the direct file, once, whole; the buffered one never


def _direct_supported(d) -> bool:
    try:
        os.close(os.open(d / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False


def test_several_writes_in_flight(tmp_path, monkeypatch, small_chunks) -> None:
    """The thread engine has IN_FLIGHT pwrites inside the kernel at once (not 1 after 1)."""
    monkeypatch.setenv("MEMOPT_AIO", "threads")
    inside, peak, lock = [0], [0], threading.Lock()
    real = io_backend._pwrite

    def slow(fd: int, buf: memoryview, off: int) -> int:
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.01)
        try:
            return real(fd, buf, off)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(io_backend, "_pwrite", slow)
    writer.write_data_file(
        str(tmp_path / "f"), b"h" * PAGE, _payload(32 << 16), "crc32", False, True
    )
    assert peak[0] == writer.IN_FLIGHT


def test_failure_waits_for_pieces_in_flight(tmp_path, monkeypatch, small_chunks) -> None:
    """ENOSPC at one piece: raised, and no piece still runs when the writer returns."""
    monkeypatch.setenv("MEMOPT_AIO", "threads")
    started, finished, lock = [0], [0], threading.Lock()

    def flaky(fd: int, buf: memoryview, off: int) -> int:
        with lock:
            started[0] += 1
            n = started[0]
        time.sleep(0.02)
        with lock:
            finished[0] += 1
        if n == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(buf)

    monkeypatch.setattr(io_backend, "_pwrite", flaky)
    with pytest.raises(OSError, match="No space left") as info:
        writer.write_data_file(
            str(tmp_path / "f"), b"h" * PAGE, _payload(1 << 20), "crc32", True, True
        )
    assert info.value.errno == errno.ENOSPC
    assert started[0] == finished[0] > 3


def test_full_disk_at_preallocation_fails_the_save(tmp_path, monkeypatch) -> None:
    def full(fd: int, off: int, n: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ckpt = AsyncCheckpointer(tmp_path, keep=2)
    ckpt.save(1, extra={"x": torch.ones(3 * PAGE)})
    ckpt.wait()
    if not _direct_supported(tmp_path):
        ckpt.close()
        pytest.skip("this file system has no O_DIRECT (no preallocation)")
    monkeypatch.setattr(writer, "_fallocate", full)
    ckpt.save(2, extra={"x": torch.zeros(3 * PAGE)})
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.wait()
    monkeypatch.undo()
    assert ckpt.steps() == [1] and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    ckpt.close()


def _slow_advance(monkeypatch, delay: float) -> None:
    real = Job.advance

    def advance(self: Job, upto: int) -> None:
        time.sleep(delay)  # a slow copy: each staged tensor takes a while
        real(self, upto)

    monkeypatch.setattr(Job, "advance", advance)


@pytest.mark.parametrize("follow", [False, True])
def test_write_starts_after_the_copy_unless_following(tmp_path, monkeypatch, follow) -> None:
    monkeypatch.setattr(writer, "CHUNK", PAGE)
    monkeypatch.setattr("memopt.checkpoint.pipeline.CHUNK", PAGE)
    monkeypatch.setattr(Pipeline, "follow_copy", follow)
    _slow_advance(monkeypatch, 0.05)
    at_start: list[tuple[int, int]] = []  # (bytes staged, bytes in all) when the writer began
    real = fileformat.write_data_file

    def spy(path, header, data, crc, fsync, direct, ready, *rest):  # type: ignore[no-untyped-def]
        job = ready.__self__  # the job's wait_copied
        at_start.append((job.copied_upto, job.plan.data_bytes))
        return real(path, header, data, crc, fsync, direct, ready, *rest)

    monkeypatch.setattr(fileformat, "write_data_file", spy)
    tensors = {f"t{i}": torch.full((PAGE,), float(i)) for i in range(6)}
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(1, extra=tensors)
        ckpt.wait()
        rec = ckpt.stats.records[-1]
        got = ckpt.load()
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert 0 < rec.write_start_s <= rec.written_s <= rec.durable_s
    ((staged, total),) = at_start
    if follow:
        assert staged < total  # started while tensors were still being copied
    else:
        assert staged == total and rec.write_start_s >= rec.copied_s - 0.04


def test_stats_throughputs(tmp_path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, extra={"x": torch.randn(1 << 18)})
        ckpt.wait()
        rec = ckpt.stats.records[-1]
        summary = ckpt.stats.summary()
    assert rec.ok and rec.nbytes == os.path.getsize(
        tmp_path / "step_0000000001" / "rank_00000.safetensors"
    )
    assert rec.writer_Bps == pytest.approx(rec.nbytes / (rec.durable_s - rec.write_start_s))
    assert rec.save_Bps == pytest.approx(rec.nbytes / rec.durable_s)
    assert rec.writer_Bps > rec.save_Bps > 0
    assert summary["mean_writer_Bps"] == pytest.approx(rec.writer_Bps)


def test_rotation_deletes_off_the_save_path(tmp_path, monkeypatch) -> None:
    """A save whose rotation deletes an old snapshot is durable before that deletion ends."""
    gate = threading.Event()
    real = publish._remove

    def blocked(trash: str) -> None:
        gate.wait(30)
        real(trash)

    monkeypatch.setattr(publish, "_remove", blocked)
    with AsyncCheckpointer(tmp_path, keep=1) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, extra={"s": torch.tensor(step)})
            ckpt.wait()  # returns although the deletions are still blocked
        assert ckpt.steps() == [3]
        assert len([n for n in os.listdir(tmp_path) if n.startswith(".trash-")]) == 2
        gate.set()
        publish.wait_deletions()
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".trash-")]
        assert int(ckpt.load()["s"]) == 3


def test_write_file_keeps_its_signature(tmp_path) -> None:
    """``fileformat.write_file`` (the checkpointer's call) delegates to the writer."""
    plan = fileformat.plan_file([("a", torch.float32, (PAGE,))], PAGE)
    data = _payload(plan.data_bytes)
    crc = fileformat.write_file(str(tmp_path / "f"), plan, data, "crc32", True, True)
    assert crc == fileformat.file_checksum(str(tmp_path / "f"), "crc32")


def test_io_engines_are_kept_across_saves_and_closed_with_the_checkpointer(
    tmp_path, monkeypatch
) -> None:
    """One I/O engine serves every save (an AIO context costs ~30 ms to destroy), files are
    still exact, and closing the checkpointer closes the engine."""
    made: list[object] = []
    closed: list[object] = []
    real = writer._engine

    def spy(direct: bool):  # type: ignore[no-untyped-def]
        engine = real(direct)
        made.append(engine)
        real_close = engine.close

        def close() -> None:
            closed.append(engine)
            real_close()

        engine.close = close  # type: ignore[method-assign]
        return engine

    monkeypatch.setattr(writer, "_engine", spy)
    with AsyncCheckpointer(tmp_path, keep=2, save_rng=False) as ckpt:
        for step in range(1, 4):
            ckpt.save(step, extra={"x": torch.full((3 * PAGE,), float(step))})
            ckpt.wait()
            assert torch.equal(ckpt.load()["x"], torch.full((3 * PAGE,), float(step)))
        assert len(made) == 1 and not closed
    assert closed == made
    # without ``engines`` a call makes its own and closes it
    plan = fileformat.plan_file([("a", torch.float32, (PAGE,))], PAGE)
    fileformat.write_file(str(tmp_path / "f"), plan, _payload(plan.data_bytes), "crc32", True, True)
    assert len(made) == 2 and closed == made


@pytest.mark.parametrize("name", ["crc32", "crc32c"])
def test_checksum_in_pieces_equals_one_pass(name) -> None:
    fn = checksum.checksum_fn(name)
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, ((1 << 20) + 123,), dtype=torch.uint8, generator=g)
    data = raw.numpy().tobytes()
    for la, lb in ((0, 5), (5, 0), (1, 1), (1000, 4097), (1 << 20, 123)):
        a, b = data[:la], data[la : la + lb]
        assert checksum.combine(name, fn(a, 0), fn(b, 0), lb) == fn(a + b, 0)
    head = fn(b"header", 0)
    for piece, workers in ((64 << 10, 2), (64 << 10, 3), (1 << 30, 2), (4096, 1)):
        got = checksum.parallel_checksum(name, memoryview(data), piece, head, workers)
        assert got == fn(b"header" + data, 0), (piece, workers)


def test_native_engine_refused_falls_back_to_threads(tmp_path, monkeypatch) -> None:
    def refused(*args: object) -> None:
        raise OSError(errno.EAGAIN, "io_setup: aio-max-nr reached")

    monkeypatch.setenv("MEMOPT_AIO", "native")
    monkeypatch.setattr(native_aio, "NativeAIOBackend", refused)
    data = _payload(3 * PAGE)
    writer.write_data_file(str(tmp_path / "f"), b"h" * PAGE, data, "crc32", False, True)
    assert open(tmp_path / "f", "rb").read()[PAGE:] == data.numpy().tobytes()
