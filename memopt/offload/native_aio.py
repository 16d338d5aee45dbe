"""Native asynchronous I/O backend (Linux AIO through raw syscalls) and backend selection.

``csrc/aio/aio.cpp`` wraps ``io_setup`` / ``io_submit`` / ``io_getevents`` (no libaio
dependency) in an engine with its own C worker thread, behind a C ABI loaded with ctypes.
``NativeAIOBackend`` implements the ``IOBackend`` protocol: ``submit`` splits a request into
``block_size`` pieces, each with its own ``Future``, and enqueues them with one call.

Pattern: the C worker keeps up to ``queue_depth`` pieces in the kernel, sleeps in ``poll`` on
an eventfd the kernel signals at each completion, reaps, resubmits the rest of a short
transfer and refills the queue without the GIL, so the device queue never waits for Python.
One Python reaper thread collects finished pieces (``memopt_aio_poll``, GIL released) and
resolves their futures. A read that ends early (the file ended) becomes EIO; a negative
result, or a request the kernel refuses at submit (EBADF, EINVAL), becomes an ``OSError``
with that errno and the same message as the thread backend's.

``make_backend`` picks the engine for ``NVMeTier``: ``MEMOPT_AIO=native`` (error if the
library did not load), ``threads``, or ``auto`` / unset (native when loaded and the file is
O_DIRECT, else threads).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from memopt._utils.native import load_library
from memopt.offload.io_backend import IOBackend, IOOp, ThreadPoolBackend, _fail

__all__ = ["NativeAIOBackend", "native_available", "make_backend"]

_ABI = 2
_lib: ctypes.CDLL | None = None
_loaded = False


def _load() -> ctypes.CDLL | None:
    global _lib, _loaded
    if not _loaded:
        _loaded = True
        lib = load_library(Path(__file__).parent, "_aio_lib", "memopt_aio", _ABI)
        if lib is not None:
            p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
            pi = ctypes.POINTER(ctypes.c_int)
            pu64, pi64 = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_int64)
            lib.memopt_aio_create.argtypes = [i, pi]
            lib.memopt_aio_create.restype = p
            lib.memopt_aio_destroy.argtypes = [p]
            lib.memopt_aio_destroy.restype = None
            lib.memopt_aio_enqueue.argtypes = [p, i, pi, pi, pu64, pi64, pi64, pu64]
            lib.memopt_aio_enqueue.restype = None
            lib.memopt_aio_poll.argtypes = [p, i, i64, pu64, pi64]
            lib.memopt_aio_poll.restype = i
        _lib = lib
    return _lib


def native_available() -> bool:
    """Whether the native AIO library was built and loaded."""
    return _load() is not None


@dataclass
class _Piece:
    op: IOOp
    nbytes: int
    offset: int
    label: str
    future: cf.Future


class NativeAIOBackend:
    """Linux AIO: ``queue_depth`` pieces of ``block_size`` in flight, kept full by a C thread."""

    name = "native"
    _POLL_BATCH = 256

    def __init__(self, queue_depth: int = 8, block_size: int = 1 << 20) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        if block_size < 4096 or block_size % 4096:
            raise ValueError(f"block_size must be a multiple of 4096, got {block_size}")
        lib = _load()
        if lib is None:
            raise RuntimeError(
                "the native AIO library is not built; rebuild with `pip install -e .` "
                "or use ThreadPoolBackend (MEMOPT_AIO=threads)"
            )
        self._lib = lib
        self.queue_depth = queue_depth
        self.block_size = block_size
        err = ctypes.c_int(0)
        self._engine = lib.memopt_aio_create(queue_depth, ctypes.byref(err))
        if not self._engine:
            raise OSError(err.value, f"io_setup({queue_depth}) failed: {os.strerror(err.value)}")
        self._lock = threading.Condition()
        self._outstanding: dict[int, _Piece] = {}
        self._next_tag = 1
        self._closing = False
        self._reaper = threading.Thread(target=self._reap_loop, name="memopt-aio", daemon=True)
        self._reaper.start()

    def submit(
        self, op: IOOp, fd: int, ptr: int, nbytes: int, offset: int, label: str
    ) -> list[cf.Future]:
        starts = list(range(0, nbytes, self.block_size))
        k = len(starts)
        if k == 0:
            return []
        sizes = [min(self.block_size, nbytes - s) for s in starts]
        futures: list[cf.Future[None]] = [cf.Future() for _ in starts]
        for fut in futures:
            fut.set_running_or_notify_cancel()
        with self._lock:
            if self._closing:
                raise RuntimeError("NativeAIOBackend is closed")
            tags = list(range(self._next_tag, self._next_tag + k))
            self._next_tag += k
            for tag, s, n, fut in zip(tags, starts, sizes, futures, strict=True):
                self._outstanding[tag] = _Piece(op, n, offset + s, label, fut)
            self._lock.notify_all()
        self._lib.memopt_aio_enqueue(
            self._engine,
            k,
            (ctypes.c_int * k)(*([int(op == "write")] * k)),
            (ctypes.c_int * k)(*([fd] * k)),
            (ctypes.c_uint64 * k)(*[ptr + s for s in starts]),
            (ctypes.c_int64 * k)(*sizes),
            (ctypes.c_int64 * k)(*[offset + s for s in starts]),
            (ctypes.c_uint64 * k)(*tags),
        )
        return futures

    @staticmethod
    def _outcome(piece: _Piece, res: int) -> OSError | None:
        if res < 0:
            err = OSError(-res, os.strerror(-res))
        elif res < piece.nbytes:
            what = "short read: the file ended before the slot did"
            err = OSError(errno.EIO, what if piece.op == "read" else "write made no progress")
        else:
            return None
        return _fail(err, piece.label, piece.op, piece.nbytes, piece.offset)

    def _reap_loop(self) -> None:
        cap = self._POLL_BATCH
        tags = (ctypes.c_uint64 * cap)()
        results = (ctypes.c_int64 * cap)()
        while True:
            with self._lock:
                while not self._outstanding and not self._closing:
                    self._lock.wait()
                if not self._outstanding and self._closing:
                    return
            n = self._lib.memopt_aio_poll(self._engine, cap, 100_000_000, tags, results)
            with self._lock:
                done = [(self._outstanding.pop(int(tags[i])), int(results[i])) for i in range(n)]
            for piece, res in done:
                err = self._outcome(piece, res)
                if err is None:
                    piece.future.set_result(None)
                else:
                    piece.future.set_exception(err)

    def close(self) -> None:
        """Finish every queued and in-flight piece, then release the engine."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify_all()
        self._reaper.join()
        self._lib.memopt_aio_destroy(self._engine)
        self._engine = None


def make_backend(
    queue_depth: int, block_size: int, kind: str | None = None, direct: bool = True
) -> IOBackend:
    """The I/O engine to use: ``kind`` or ``$MEMOPT_AIO`` = native | threads | auto.

    auto: native when its library loaded and the file is O_DIRECT (Linux AIO on a buffered
    file runs the I/O inside ``io_submit``, so threads overlap better there), else threads."""
    kind = (kind or os.environ.get("MEMOPT_AIO") or "auto").lower()
    if kind not in ("auto", "native", "threads"):
        raise ValueError(f"MEMOPT_AIO must be native, threads or auto, not {kind!r}")
    if kind == "native" or (kind == "auto" and direct and native_available()):
        return NativeAIOBackend(queue_depth, block_size)
    return ThreadPoolBackend(queue_depth, block_size)
