"""Writing one checkpoint tensor file at the disk's bandwidth, without giving up durability.

``write_data_file(path, header, data, ...)`` (the writer thread's one call per save):

1. Create the file (``O_EXCL``; ``O_DIRECT`` when the file system allows it and the buffers
   are page-aligned) and preallocate its whole size (``posix_fallocate``). Why: on ext4 (and
   xfs) a direct write that *extends* a file takes the inode lock exclusively and waits for its
   own I/O, so writes into a bare new file run one at a time however many are issued; writes
   inside a preallocated file run in parallel under a shared lock. It also turns a full disk
   into one early ``ENOSPC`` instead of a half-written file.
2. Submit the header, then the data section in ``CHUNK`` pieces to an I/O engine of
   ``memopt.offload`` (the NVMe tier's: the native Linux AIO engine, whose C thread keeps up to
   ``IN_FLIGHT`` pieces in the kernel without the GIL, when its library loaded and the file is
   ``O_DIRECT``; else a pool of ``IN_FLIGHT`` threads issuing ``pwrite``). Every chunk is
   submitted at once (the engine queues what is beyond ``IN_FLIGHT``), each after
   ``ready(end of chunk)`` returned: a pipeline whose writer follows the copy into staging
   blocks there until that prefix of ``data`` is staged.
3. Only then the checksum of the data, while the disk writes it, over ``CHUNK`` pieces on
   ``CRC_WORKERS`` threads (1 on small machines), combined (``checksum.parallel_checksum``;
   both CRC libraries release the GIL): a checksum slowed by busy cores never holds back a
   submission, so the queue stays full; it is on the path only if it outlasts the write.
4. Wait for every piece (after a failure too: the staging memory must outlive its I/O), then
   ``fsync``; the caller publishes (rename) only after that.

The engines outlive the call when the caller passes ``engines`` (``Engines``: the
checkpointer keeps one for its writer thread): destroying a Linux AIO context
(``io_destroy``) waits for an RCU grace period, ~30 ms on the VM of docs/benchmarks.md, which
a new engine per file put on every save's path to durable (6% of a 1.2 GB write there).

``IN_FLIGHT * CHUNK`` bytes are in the kernel at once (64 MiB: the same bytes in flight as
fio with 1 MiB blocks at queue depth 64, the comparison ``benchmarks/ckpt_stall_bench.py``
makes). Engine choice: ``MEMOPT_AIO`` = native | threads | auto, as for the NVMe tier; the
"threads" engine here is ``WorkerIO`` (``IN_FLIGHT`` pre-started ``memopt._utils.workers``
threads issuing ``pwrite``), not the NVMe tier's ``concurrent.futures`` pool: that pool
refuses work once the main thread has returned, while a training thread may still save and
the exit hook may still be finishing a save. The checkpointer's ``Engines`` also keep a small
engine started with the checkpointer, used when no new thread can be started any more
(Python 3.12 refuses them once the main thread has returned), and, on machines that
checksum on 2+ threads, the checksum threads.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future

import torch

from memopt._utils.workers import Workers
from memopt.checkpoint.checksum import checksum_fn, parallel_checksum
from memopt.checkpoint.copy_crc import has_own_memory
from memopt.offload.io_backend import IOBackend, IOOp, _read_piece, _write_piece
from memopt.offload.native_aio import make_backend, native_available

__all__ = [
    "CHUNK", "IN_FLIGHT", "Engines", "WorkerIO", "bytes_in_flight", "tensor_bytes",
    "write_data_file",
]

CHUNK = 8 << 20  # bytes per write request (the device splits it at max_sectors_kb)
IN_FLIGHT = 8  # requests in the kernel at once
# Threads of the checksum pass: one core's crc32c (~8 GB/s here) is below what an NVMe array
# writes, so 2 where there are cores to spare; on a small machine 1, since a second busy
# thread preempts the training's own (on this 2-core VM's 1-2 GB/s disk both measured alike).
CRC_WORKERS = 2 if (os.cpu_count() or 1) >= 8 else 1
_PAGE = 4096

# Looked up at call time so tests can inject a full disk.
_fallocate = os.posix_fallocate


def bytes_in_flight() -> int:
    """Bytes the writer keeps in the kernel at once (``IN_FLIGHT * CHUNK``)."""
    return IN_FLIGHT * CHUNK


def _open_new(path: str, direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes; a file system without fallocate just skips it (not an error)."""
    try:
        _fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise  # ENOSPC and friends: the save fails early and cleanly


class WorkerIO:
    """An ``IOBackend``: ``queue_depth`` pre-started worker threads, each issuing positional
    writes (reads) of one ``block_size`` piece at a time (the pieces of ``io_backend``)."""

    name = "threads"

    def __init__(self, queue_depth: int, block_size: int, label: str = "memopt-ckptio") -> None:
        self.queue_depth, self.block_size = queue_depth, block_size
        self._workers = Workers(queue_depth, label)

    def submit(
        self, op: IOOp, fd: int, ptr: int, nbytes: int, offset: int, label: str
    ) -> list[Future[None]]:
        fn = _write_piece if op == "write" else _read_piece
        return [
            self._workers.submit(fn, fd, ptr + lo, min(self.block_size, nbytes - lo),
                                 offset + lo, label)
            for lo in range(0, nbytes, self.block_size)
        ]  # fmt: skip

    def close(self) -> None:
        self._workers.close()


def _native(direct: bool) -> bool:
    """Whether ``MEMOPT_AIO`` asks for the native engine for this file (the NVMe tier's rule:
    auto takes it for O_DIRECT files when its library loaded)."""
    kind = (os.environ.get("MEMOPT_AIO") or "auto").lower()
    if kind not in ("auto", "native", "threads"):
        raise ValueError(f"MEMOPT_AIO must be native, threads or auto, not {kind!r}")
    return kind == "native" or (kind == "auto" and direct and native_available())


def _engine(direct: bool) -> IOBackend:
    if _native(direct):
        try:
            return make_backend(IN_FLIGHT, CHUNK, kind="native", direct=direct)
        except OSError:  # io_setup refused (the system's aio-max-nr is used up): threads work
            pass
    return WorkerIO(IN_FLIGHT, CHUNK)


class Engines:
    """I/O engines kept from one ``write_data_file`` to the next, one per kind (``O_DIRECT``
    or buffered), created on first use; ``close()`` releases them. One writer thread at a
    time: every call waits for all its pieces before it returns, so calls never overlap.

    ``at_exit=True`` (the checkpointer's): threads started now, for when none can be started
    later: a 2-thread ``WorkerIO`` that serves any kind whose engine cannot be made then, and
    the checksum threads (``CRC_WORKERS`` > 1)."""

    def __init__(self, at_exit: bool = False) -> None:
        self._by_kind: dict[bool, IOBackend] = {}
        self._spare = WorkerIO(2, CHUNK, "memopt-ckptio-spare") if at_exit else None
        self.crc = Workers(CRC_WORKERS, "memopt-crc") if at_exit and CRC_WORKERS > 1 else None

    def get(self, direct: bool) -> IOBackend:
        if direct not in self._by_kind:
            try:
                self._by_kind[direct] = _engine(direct)
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                if self._spare is None:
                    raise
                self._by_kind[direct] = self._spare
        return self._by_kind[direct]

    def close(self) -> None:
        engines = {id(e): e for e in [*self._by_kind.values(), self._spare] if e is not None}
        self._by_kind.clear()
        for engine in engines.values():
            engine.close()
        if self.crc is not None:
            self.crc.close()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 CPU tensor, without a copy (empty: an empty view)."""
    return memoryview(t.numpy().data) if t.numel() else memoryview(b"")


def _page_buffer(raw: bytes) -> tuple[ctypes.Array[ctypes.c_char], int]:
    """``raw`` copied into page-aligned memory (O_DIRECT needs aligned buffers): (buf, addr).

    The ctypes array keeps the mapping alive; it is unmapped when the array is dropped."""
    m = mmap.mmap(-1, max(len(raw), 1))
    m.write(raw)
    buf = (ctypes.c_char * len(m)).from_buffer(m)
    return buf, ctypes.addressof(buf)


def write_data_file(
    path: str,
    header: bytes,
    data: torch.Tensor,
    checksum: str,
    fsync: bool,
    direct: bool,
    ready: Callable[[int], None] | None = None,
    engines: Engines | None = None,
    known_checksum: Callable[[], int | None] | None = None,
) -> int:
    """Write ``header`` then ``data`` (uint8, CPU) to a new file; return the running checksum.

    ``direct``: use ``O_DIRECT`` when possible (the sizes must be page multiples and ``data``
    page-aligned, else buffered). ``ready(n)`` blocks until ``data[:n]`` holds its values.
    ``engines``: I/O engines to use and keep (else made for this call and closed after it).
    ``known_checksum()``: the file's checksum if someone already computed it (the copier, in
    the same pass as the copy: ``copy_crc``), else None and it is computed here."""
    plain = data.dtype == torch.uint8 and data.device.type == "cpu" and data.is_contiguous()
    if not (plain and has_own_memory(data)):  # its address goes to native code (the engine)
        raise ValueError(
            f"write_data_file({path}): data must be a plain contiguous uint8 CPU tensor over "
            f"its own memory, got a {type(data).__name__} of {data.dtype} on {data.device}"
        )
    n = data.numel()
    view = tensor_bytes(data)
    aligned = not (data.data_ptr() % _PAGE or len(header) % _PAGE or n % _PAGE)
    crc = checksum_fn(checksum)
    fd, is_direct = _open_new(path, direct and aligned)
    pool = Engines() if engines is None else engines
    try:
        engine = pool.get(is_direct)
    except BaseException:
        os.close(fd)
        raise
    head_buf, head_addr = _page_buffer(header)
    pending: list[Future[None]] = []
    try:
        if is_direct:
            _preallocate(fd, len(header) + n)
        pending += engine.submit("write", fd, head_addr, len(header), 0, path)
        base, addr = len(header), data.data_ptr()
        for lo in range(0, n, CHUNK):  # everything staged goes to the engine's queue first
            hi = min(lo + CHUNK, n)
            if ready is not None:
                ready(hi)
            pending += engine.submit("write", fd, addr + lo, hi - lo, base + lo, path)
        # then the checksum, while the disk writes (unless the copier already made it)
        value = known_checksum() if known_checksum is not None else None
        if value is None:
            value = parallel_checksum(checksum, view, CHUNK, crc(header, 0), CRC_WORKERS,
                                      pool.crc)  # fmt: skip
        _wait_all(pending)
        if fsync:
            os.fsync(fd)
    finally:
        _wait_all(pending, raise_first=False)  # after a failure: no I/O may outlive the buffers
        if engines is None:  # made for this call
            pool.close()
        os.close(fd)
        del head_buf  # (only now: the header's write has finished)
    return value


def _wait_all(futures: list[Future[None]], raise_first: bool = True) -> None:
    error: BaseException | None = None
    for f in futures:
        e = f.exception()
        if e is not None and error is None:
            error = e
    if error is not None and raise_first:
        raise error
