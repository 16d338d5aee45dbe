"""Asynchronous file I/O backends for the NVMe tier: a small protocol and a thread-pool one.

A backend moves bytes between host memory (a raw address, normally inside the pinned arena, so
O_DIRECT alignment holds) and an already open file descriptor. ``submit`` splits a request
into ``block_size`` pieces and returns one ``concurrent.futures.Future`` per piece; the tier
gathers them into an ``IOFuture``. The fd stays open for the tier's life: no open/close per I/O.

``ThreadPoolBackend`` is the pure-Python one: ``queue_depth`` worker threads each issue
``os.pwrite`` / ``os.preadv`` on a ``memoryview`` of the buffer (built with ctypes, no copy).
They are ``memopt._utils.Workers``, not a ``concurrent.futures`` executor, whose exit hook
refuses new work once the main thread has returned: a training loop running in another
thread keeps its NVMe tier until it ends.
Both calls release the GIL, so up to ``queue_depth`` requests are in flight in the kernel at
once, which is what an NVMe device needs to reach its bandwidth. A native backend (io_uring
or libaio from ``csrc/``) implements the same ``IOBackend`` protocol and plugs in unchanged.

Errors: a failed syscall becomes an ``OSError`` with the same ``errno`` and a message naming
the operation, file and offset; a short read (file ended) becomes EIO.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import os
from typing import Literal, Protocol, runtime_checkable

from memopt._utils.workers import Workers
from memopt.offload.tier import check_process

__all__ = ["IOBackend", "ThreadPoolBackend"]

IOOp = Literal["read", "write"]

# Looked up at call time so tests can inject failures (e.g. ENOSPC half-way through a write).
_pwrite = os.pwrite
_preadv = os.preadv


@runtime_checkable
class IOBackend(Protocol):
    """What the NVMe tier needs from an asynchronous I/O engine."""

    name: str
    queue_depth: int
    block_size: int

    def submit(
        self, op: IOOp, fd: int, ptr: int, nbytes: int, offset: int, label: str
    ) -> list[cf.Future]:
        """Start moving ``nbytes`` between address ``ptr`` and file offset ``offset``."""
        ...

    def close(self) -> None:
        """Finish in-flight work and release threads / rings."""
        ...


def _buffer(ptr: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")


def _fail(err: OSError, label: str, op: IOOp, nbytes: int, offset: int) -> OSError:
    code = err.errno or errno.EIO
    name = errno.errorcode.get(code, str(code))
    return OSError(
        code,
        f"{label}: {op} of {nbytes} bytes at file offset {offset} failed: "
        f"[{name}] {err.strerror or os.strerror(code)}",
    )


def _write_piece(fd: int, ptr: int, nbytes: int, offset: int, label: str) -> None:
    view = _buffer(ptr, nbytes)
    done = 0
    try:
        while done < nbytes:
            n = _pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            done += n
    except OSError as err:
        raise _fail(err, label, "write", nbytes, offset) from err


def _read_piece(fd: int, ptr: int, nbytes: int, offset: int, label: str) -> None:
    view = _buffer(ptr, nbytes)
    done = 0
    try:
        while done < nbytes:
            n = _preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short read: the file ended before the slot did")
            done += n
    except OSError as err:
        raise _fail(err, label, "read", nbytes, offset) from err


class ThreadPoolBackend:
    """``queue_depth`` threads issuing positional reads/writes of ``block_size`` pieces."""

    name = "threads"

    def __init__(self, queue_depth: int = 8, block_size: int = 1 << 20) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        if block_size < 4096 or block_size % 4096:
            raise ValueError(f"block_size must be a multiple of 4096, got {block_size}")
        self.queue_depth = queue_depth
        self.block_size = block_size
        self._pool = Workers(queue_depth, "memopt-io")
        self._pid = os.getpid()  # the pool's threads exist only in this process

    def submit(
        self, op: IOOp, fd: int, ptr: int, nbytes: int, offset: int, label: str
    ) -> list[cf.Future]:
        check_process(self._pid, "ThreadPoolBackend")  # forked: no thread would run it
        fn = _write_piece if op == "write" else _read_piece
        futures = []
        for start in range(0, nbytes, self.block_size):
            n = min(self.block_size, nbytes - start)
            futures.append(self._pool.submit(fn, fd, ptr + start, n, offset + start, label))
        return futures

    def close(self) -> None:
        # (a forked child: nothing, the threads are the parent's; from one of the workers
        # itself, a finalizer run by a garbage collection there: the others are joined and
        # that one ends after its call)
        self._pool.close()
