"""A few daemon worker threads, started up front, that keep working while the interpreter exits.

Why not ``concurrent.futures.ThreadPoolExecutor``: its own exit hook (one of ``threading``'s
exit callbacks, which run when the main thread returns, *before* the other non-daemon threads
are joined) makes every later ``submit`` raise "cannot schedule new futures after interpreter
shutdown". Work that must still run after the main thread returned (a training loop in a
thread that keeps saving, a checkpoint finished by an ``atexit`` hook) cannot use it. Nor can
it start threads then: Python 3.12.1 refuses ``Thread.start()`` once the main thread has
returned ("can't create new thread at interpreter shutdown"). So ``Workers`` starts its
threads in the constructor and feeds them through a queue; they are daemons, so an idle pool
never holds up the exit.

``submit`` returns a ``concurrent.futures.Future``: the class alone, a result holder that
works at any time (only executors refuse work). ``close()`` lets queued work finish and joins
the threads. In a forked child the threads do not exist: ``submit`` raises there.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["Workers"]

T = TypeVar("T")
_Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class Workers:
    """``count`` daemon threads named ``name-<i>``, running submitted calls in order."""

    def __init__(self, count: int, name: str) -> None:
        if count < 1:
            raise ValueError(f"Workers({name!r}): count must be >= 1, got {count}")
        self.name = name
        self._q: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # submit vs. close
        self._pid = os.getpid()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        for i, t in enumerate(self._threads):
            try:
                t.start()
            except BaseException:  # (no thread at shutdown): stop the ones already running
                self._closed = True
                for _ in range(i):
                    self._q.put(None)
                raise

    def _run(self) -> None:
        while (task := self._q.get()) is not None:
            fut, fn, args = task
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller by the future
                fut.set_exception(e)
            else:
                fut.set_result(result)
            del task, fut, fn, args  # (no reference to the last call's data while idle)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a worker; its result or exception comes from the future."""
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"Workers({self.name!r}) was made in process {self._pid}; its threads do not "
                f"exist in this forked child (pid {os.getpid()})"
            )
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"Workers({self.name!r}) is closed")
            self._q.put((fut, fn, args))
        return fut

    def map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        """``[fn(x) for x in items]`` on the workers, in order; raises the first failure
        (after every call has finished)."""
        futures = [self.submit(fn, x) for x in items]
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Finish the queued calls, then stop and join the threads (twice: nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._q.put(None)
        if os.getpid() != self._pid:  # a forked child: the threads are the parent's
            return
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:  # (closed from one of its own calls: that thread ends after it)
                t.join()
