"""Native asynchronous I/O backend (Linux AIO through raw syscalls) and backend selection.

``csrc/aio/aio.cpp`` wraps ``io_setup`` / ``io_submit`` / ``io_getevents`` (no libaio
dependency) in an engine with its own C worker thread, behind a C ABI loaded with ctypes.
``NativeAIOBackend`` implements the ``IOBackend`` protocol: ``submit`` hands the request to
the engines, which cut it into ``block_size`` pieces themselves, and returns one ``Future``
per engine part (the thread backend returns one per piece).

Pattern: ``workers`` engines (default 1, ``MEMOPT_AIO_WORKERS``) share the queue depth; a
request is cut into one block-aligned part per engine. Each engine's C worker keeps its share
of the pieces in the kernel, sleeps in ``poll`` on an eventfd the kernel signals at each
completion, reaps, resubmits the rest of a short transfer and refills the queue without the
GIL, so the device queue never waits for Python. An engine reports a part once, when its
last piece is done, so its Python reaper thread (``memopt_aio_poll``, GIL released)
resolves one future per part rather than one per piece (a 64 MiB tensor at 1 MiB blocks:
1 completion instead of 64). A read that ends early (the file ended) becomes EIO; a failed
piece (negative result, or a request the kernel refuses at submit: EBADF, EINVAL) becomes
an ``OSError`` with that errno and the same message as the thread backend's, naming the
failed piece's offset and length.

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
import weakref
from dataclasses import dataclass
from pathlib import Path

from memopt._utils.native import load_library
from memopt.offload.io_backend import IOBackend, IOOp, ThreadPoolBackend, _fail
from memopt.offload.sigdefer import deferred_sigint
from memopt.offload.tier import check_process

__all__ = ["NativeAIOBackend", "native_available", "make_backend", "default_workers"]

_ABI = 4  # 3: the engine cuts requests into pieces, one completion per request
# 4: memopt_copy_crc32c (csrc/aio/copy_crc.cpp, bound in memopt/checkpoint/copy_crc.py)
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
            lib.memopt_aio_enqueue.argtypes = [p, i, pi, pi, pu64, pi64, pi64, pu64, i64]
            lib.memopt_aio_enqueue.restype = None
            lib.memopt_aio_poll.argtypes = [p, i, i64, pu64, pi64, pi64, pi64]
            lib.memopt_aio_poll.restype = i
        _lib = lib
    return _lib


def native_available() -> bool:
    """Whether the native AIO library was built and loaded."""
    return _load() is not None


@dataclass
class _Request:
    op: IOOp
    label: str
    future: cf.Future
    enqueued: bool = False  # handed to the engine (set under the lock with the tag)


class _Engine:
    """One C engine (AIO context + worker thread) and the Python reaper resolving its futures."""

    _POLL_BATCH = 256

    def __init__(self, lib: ctypes.CDLL, depth: int, block_size: int) -> None:
        self._lib = lib
        self.block_size = block_size
        err = ctypes.c_int(0)
        self._engine = lib.memopt_aio_create(depth, ctypes.byref(err))
        if not self._engine:
            raise OSError(err.value, f"io_setup({depth}) failed: {os.strerror(err.value)}")
        self._lock = threading.Condition()
        self._outstanding: dict[int, _Request] = {}
        self._next_tag = 1
        self._closing = False
        self._pid = os.getpid()  # the reaper and the C worker exist only in this process
        self._reaper = threading.Thread(target=self._reap_loop, name="memopt-aio", daemon=True)
        self._reaper.start()

    def submit(
        self, op: IOOp, fd: int, ptr: int, nbytes: int, offset: int, label: str
    ) -> cf.Future:
        check_process(self._pid, "NativeAIOBackend")
        fut: cf.Future[None] = cf.Future()
        fut.set_running_or_notify_cancel()
        args = (
            ctypes.byref(ctypes.c_int(int(op == "write"))), ctypes.byref(ctypes.c_int(fd)),
            ctypes.byref(ctypes.c_uint64(ptr)), ctypes.byref(ctypes.c_int64(nbytes)),
            ctypes.byref(ctypes.c_int64(offset)),
        )  # fmt: skip
        # Registering the tag and enqueueing it happen together: under the lock (so close()
        # never sees one without the other) and with Ctrl-C held back (a KeyboardInterrupt
        # between them left a tag the engine never saw, and close() waited for it forever).
        with deferred_sigint(), self._lock:
            if self._closing:
                raise RuntimeError("NativeAIOBackend is closed")
            tag = self._next_tag
            self._next_tag += 1
            req = self._outstanding[tag] = _Request(op, label, fut)
            try:
                self._lib.memopt_aio_enqueue(
                    self._engine, 1, *args, ctypes.byref(ctypes.c_uint64(tag)), self.block_size
                )
            except BaseException:  # the call failed before the engine took it
                del self._outstanding[tag]
                raise
            req.enqueued = True
            self._lock.notify_all()
        return fut

    @staticmethod
    def _outcome(req: _Request, status: int, offset: int, nbytes: int) -> OSError | None:
        """None for success, else the error of the failed piece (errno, or -1: short)."""
        if status == 0:
            return None
        if status > 0:
            err = OSError(status, os.strerror(status))
        else:
            what = "short read: the file ended before the slot did"
            err = OSError(errno.EIO, what if req.op == "read" else "write made no progress")
        return _fail(err, req.label, req.op, nbytes, offset)

    def _reap_loop(self) -> None:
        """Resolve futures until closed with nothing outstanding, then release the engine
        (here, so a close from this very thread, e.g. a finalizer run by a garbage
        collection on it, needs no join). If reaping fails the engine is leaked, never
        released under a request still being enqueued."""
        self._reap()
        self._lib.memopt_aio_destroy(self._engine)
        self._engine = None

    def _reap(self) -> None:
        cap = self._POLL_BATCH
        tags = (ctypes.c_uint64 * cap)()
        status, offsets, lengths = ((ctypes.c_int64 * cap)() for _ in range(3))
        while True:
            with self._lock:
                while not self._outstanding and not self._closing:
                    self._lock.wait()
                if self._closing:
                    self._fail_unsent()
                if not self._outstanding and self._closing:
                    return
            n = self._lib.memopt_aio_poll(
                self._engine, cap, 100_000_000, tags, status, offsets, lengths
            )
            with self._lock:
                done = [(self._outstanding.pop(int(tags[i]), None), i) for i in range(n)]
            for req, i in done:
                if req is None:  # a tag failed by _fail_unsent: nobody waits for it
                    continue
                err = self._outcome(req, int(status[i]), int(offsets[i]), int(lengths[i]))
                if err is None:
                    req.future.set_result(None)
                else:
                    req.future.set_exception(err)

    def _fail_unsent(self) -> None:
        """Closing (lock held): a request the engine never took will never complete; fail it
        rather than wait for it (submit registers and enqueues together, so none should
        exist; this keeps close() bounded if one ever does)."""
        for tag in [t for t, r in self._outstanding.items() if not r.enqueued]:
            req = self._outstanding.pop(tag)
            req.future.set_exception(RuntimeError(f"{req.label}: never submitted (closed)"))

    def close(self) -> None:
        """Finish every queued and in-flight piece, then release the engine (the reaper
        does, on its way out; called from the reaper itself, this does not wait). In a
        process forked from the one that made the engine this only marks it closed: its
        threads, and the requests they serve, exist only in the parent."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if os.getpid() != self._pid:
            return
        if threading.current_thread() is not self._reaper:
            self._reaper.join()


def default_workers() -> int:
    """``$MEMOPT_AIO_WORKERS``, else 1 (see ``NativeAIOBackend``)."""
    env = os.environ.get("MEMOPT_AIO_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"MEMOPT_AIO_WORKERS must be an integer >= 1, not {env!r}")
        return int(env)
    return 1


class NativeAIOBackend:
    """Linux AIO: ``queue_depth`` pieces of ``block_size`` in flight, kept full by C threads.

    ``workers`` engines (AIO context + C submit/reap thread each) share the queue depth; a
    request is cut into ``workers`` contiguous, block-aligned parts, one per engine (a request
    of one block goes to the engines in turn). More than one spreads the kernel's O_DIRECT
    submission work (pinning pages, building bios) over several cores and gives the queue
    refill more than one scheduler share on a busy machine; on the 2-core VM of
    docs/benchmarks.md two workers were 1.5-2.2x one under heavy load in a scratch A/B but
    not better in the recorded benchmark runs, so the default stays 1.
    ``submit`` returns one future per part.
    """

    name = "native"

    def __init__(
        self, queue_depth: int = 8, block_size: int = 1 << 20, workers: int | None = None
    ) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        if block_size < 4096 or block_size % 4096:
            raise ValueError(f"block_size must be a multiple of 4096, got {block_size}")
        workers = default_workers() if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        lib = _load()
        if lib is None:
            raise RuntimeError(
                "the native AIO library is not built; rebuild with `pip install -e .` "
                "or use ThreadPoolBackend (MEMOPT_AIO=threads)"
            )
        self.queue_depth = queue_depth
        self.block_size = block_size
        self.workers = min(workers, queue_depth)
        depths = [queue_depth // self.workers + (i < queue_depth % self.workers)
                  for i in range(self.workers)]  # fmt: skip
        self._engines: list[_Engine] = []
        # A backend garbage-collected without close() stops its engines (their reaper
        # threads hold the engines, not the backend, so the backend itself can be freed).
        self._finalizer = weakref.finalize(self, _close_engines, self._engines)
        self._finalizer.atexit = False  # at exit the daemon threads just end, as before
        try:
            for depth in depths:
                self._engines.append(_Engine(lib, depth, block_size))
        except OSError:
            self.close()
            raise
        self._turn = 0

    def submit(
        self, op: IOOp, fd: int, ptr: int, nbytes: int, offset: int, label: str
    ) -> list[cf.Future]:
        if nbytes <= 0:
            return []
        blocks = -(-nbytes // self.block_size)
        parts = min(len(self._engines), blocks)
        per = -(-blocks // parts) * self.block_size
        first, self._turn = self._turn, (self._turn + 1) % len(self._engines)
        futures = []
        for i, start in enumerate(range(0, nbytes, per)):
            engine = self._engines[(first + i) % len(self._engines)]
            n = min(per, nbytes - start)
            futures.append(engine.submit(op, fd, ptr + start, n, offset + start, label))
        return futures

    def close(self) -> None:
        """Finish every queued and in-flight piece, then release the engines."""
        self._finalizer.detach()
        _close_engines(self._engines)


def _close_engines(engines: list[_Engine]) -> None:
    for engine in engines:
        engine.close()


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
