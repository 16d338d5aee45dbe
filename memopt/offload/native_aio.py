"""Native asynchronous I/O backend (Linux AIO through raw syscalls) and backend selection.

``csrc/aio/aio.cpp`` wraps ``io_setup`` / ``io_submit`` / ``io_getevents`` (no libaio
dependency) behind a C ABI loaded with ctypes. ``NativeAIOBackend`` implements the
``IOBackend`` protocol: ``submit`` splits a request into ``block_size`` pieces, each with its
own ``Future``, and queues them; at most ``queue_depth`` pieces are in the kernel at once.

Pattern: callers queue pieces and "pump" (submit as many as the depth allows, in one
``io_submit`` batch) under a lock; one reaper thread blocks in ``io_getevents`` (GIL released
by ctypes), resolves the futures of completed pieces and pumps again. A short transfer with
progress resubmits the remainder; a read that returns 0 bytes (the file ended) becomes EIO; a
negative result, or a request the kernel refuses at submit (EBADF, EINVAL), becomes an
``OSError`` with that errno and the same message as the thread backend's.

``make_backend`` picks the engine for ``NVMeTier``: ``MEMOPT_AIO=native`` (error if the
library did not load), ``threads``, or ``auto`` / unset (native when loaded and the file is
O_DIRECT, else threads).
"""

from __future__ import annotations

import collections
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

_ABI = 1
_MAX_BATCH = 256
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
            lib.memopt_aio_submit.argtypes = [p, i, pi, pi, pu64, pi64, pi64, pu64, pi]
            lib.memopt_aio_submit.restype = i
            lib.memopt_aio_wait.argtypes = [p, i, i, i64, pu64, pi64]
            lib.memopt_aio_wait.restype = i
        _lib = lib
    return _lib


def native_available() -> bool:
    """Whether the native AIO library was built and loaded."""
    return _load() is not None


@dataclass
class _Piece:
    op: IOOp
    fd: int
    ptr: int
    nbytes: int
    offset: int
    label: str
    future: cf.Future
    done: int = 0  # bytes already moved (a short transfer resubmits the rest)


class NativeAIOBackend:
    """Linux AIO: ``queue_depth`` pieces of ``block_size`` in flight, one reaper thread."""

    name = "native"

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
        self._ctx = lib.memopt_aio_create(queue_depth, ctypes.byref(err))
        if not self._ctx:
            raise OSError(err.value, f"io_setup({queue_depth}) failed: {os.strerror(err.value)}")
        self._cond = threading.Condition()
        self._pending: collections.deque[_Piece] = collections.deque()
        self._inflight: dict[int, _Piece] = {}
        self._next_tag = 1
        self._closing = False
        self._reaper = threading.Thread(target=self._reap_loop, name="memopt-aio", daemon=True)
        self._reaper.start()

    def submit(
        self, op: IOOp, fd: int, ptr: int, nbytes: int, offset: int, label: str
    ) -> list[cf.Future]:
        if self._closing:
            raise RuntimeError("NativeAIOBackend is closed")
        futures = []
        pieces = []
        for start in range(0, nbytes, self.block_size):
            n = min(self.block_size, nbytes - start)
            fut: cf.Future = cf.Future()
            fut.set_running_or_notify_cancel()
            pieces.append(_Piece(op, fd, ptr + start, n, offset + start, label, fut))
            futures.append(fut)
        with self._cond:
            self._pending.extend(pieces)
            failed = self._pump()
            self._cond.notify_all()
        self._resolve(failed)
        return futures

    def _pump(self) -> list[tuple[_Piece, OSError | None]]:
        """Submit pending pieces up to the depth (lock held); return the refused ones."""
        failed: list[tuple[_Piece, OSError | None]] = []
        room = min(self.queue_depth - len(self._inflight), _MAX_BATCH)
        if room <= 0 or not self._pending:
            return failed
        batch = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        k = len(batch)
        ops = (ctypes.c_int * k)(*[int(p.op == "write") for p in batch])
        fds = (ctypes.c_int * k)(*[p.fd for p in batch])
        bufs = (ctypes.c_uint64 * k)(*[p.ptr + p.done for p in batch])
        sizes = (ctypes.c_int64 * k)(*[p.nbytes - p.done for p in batch])
        offs = (ctypes.c_int64 * k)(*[p.offset + p.done for p in batch])
        tags = list(range(self._next_tag, self._next_tag + k))
        self._next_tag += k
        ctags = (ctypes.c_uint64 * k)(*tags)
        status = (ctypes.c_int * k)()
        self._lib.memopt_aio_submit(self._ctx, k, ops, fds, bufs, sizes, offs, ctags, status)
        requeue = []
        for piece, tag, st in zip(batch, tags, status, strict=True):
            if st == 0:
                self._inflight[tag] = piece
            elif st == -errno.EAGAIN:
                requeue.append(piece)
            else:
                failed.append((piece, self._error(piece, -st)))
        self._pending.extendleft(reversed(requeue))
        return failed

    @staticmethod
    def _error(piece: _Piece, code: int) -> OSError:
        err = OSError(code, os.strerror(code))
        return _fail(err, piece.label, piece.op, piece.nbytes, piece.offset)

    @staticmethod
    def _resolve(done: list[tuple[_Piece, OSError | None]]) -> None:
        for piece, err in done:
            if err is None:
                piece.future.set_result(None)
            else:
                piece.future.set_exception(err)

    def _complete(self, piece: _Piece, res: int) -> OSError | None | bool:
        """The outcome of one completion: None (done), an error, or True (resubmit rest)."""
        if res < 0:
            return self._error(piece, -res)
        if res == 0:
            what = "short read: the file ended before the slot did"
            if piece.op == "write":
                what = "write made no progress"
            return _fail(
                OSError(errno.EIO, what), piece.label, piece.op, piece.nbytes, piece.offset
            )
        piece.done += res
        return True if piece.done < piece.nbytes else None

    def _reap_loop(self) -> None:
        cap = min(self.queue_depth, _MAX_BATCH)
        tags = (ctypes.c_uint64 * cap)()
        results = (ctypes.c_int64 * cap)()
        while True:
            with self._cond:
                while not self._inflight and not (self._closing and not self._pending):
                    self._cond.wait()
                if not self._inflight and self._closing and not self._pending:
                    return
            n = self._lib.memopt_aio_wait(self._ctx, 1, cap, 100_000_000, tags, results)
            done: list[tuple[_Piece, OSError | None]] = []
            with self._cond:
                for i in range(max(n, 0)):
                    piece = self._inflight.pop(int(tags[i]))
                    outcome = self._complete(piece, int(results[i]))
                    if outcome is True:
                        self._pending.appendleft(piece)
                    else:
                        done.append((piece, outcome if isinstance(outcome, OSError) else None))
                done += self._pump()
                self._cond.notify_all()
            self._resolve(done)

    def close(self) -> None:
        """Finish every queued and in-flight piece, then release the context."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._reaper.join()
        self._lib.memopt_aio_destroy(self._ctx)
        self._ctx = None


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
