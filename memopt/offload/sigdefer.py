"""Hold back Ctrl-C across a few statements that must happen together.

Python raises ``KeyboardInterrupt`` in the main thread at the next bytecode boundary after
SIGINT, so a Ctrl-C can land between registering an I/O request and handing it to the
kernel: the request is then awaited by ``close()`` forever, or its buffer is freed while the
kernel still writes into it. ``deferred_sigint()`` records a SIGINT that arrives inside it and
calls the handler that was installed (``KeyboardInterrupt`` by default) on the way out, once
the block has finished. Nothing is deferred off the main thread (Python runs signal handlers
only there), when SIGINT has no Python handler (ignored, or the default action), or inside
another ``deferred_sigint`` (the outer one holds it). Keep the blocks short: Ctrl-C waits
for them.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["deferred_sigint"]

_depth = 0  # deferring blocks open on the main thread (only it changes this)


class deferred_sigint:  # noqa: N801 - used like a function: ``with deferred_sigint():``
    """Context manager; see the module docstring."""

    __slots__ = ("_caught", "_hold", "_old")

    def __enter__(self) -> deferred_sigint:
        global _depth
        self._old: Any = None
        self._hold: Any = None
        self._caught: tuple[int, FrameType | None] | None = None
        if _depth or threading.current_thread() is not threading.main_thread():
            return self
        old = signal.getsignal(signal.SIGINT)
        if not callable(old):
            return self

        def hold(signum: int, frame: FrameType | None) -> None:
            self._caught = (signum, frame)

        self._hold, self._old = hold, old
        # signal.signal dispatches a SIGINT already pending before it swaps (raised here,
        # before the block starts); from its return on, SIGINT goes to hold
        signal.signal(signal.SIGINT, hold)
        _depth += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _depth
        old = self._old
        if old is None:
            return
        _depth -= 1
        hold, self._old, self._hold = self._hold, None, None  # (hold refers to self)
        # restores old; dispatches a SIGINT still pending to hold first
        prev = signal.signal(signal.SIGINT, old)
        if prev is not hold and callable(prev):  # the block installed its own: keep it
            signal.signal(signal.SIGINT, prev)
        caught, self._caught = self._caught, None
        if caught is not None:
            old(*caught)  # the deferred Ctrl-C: KeyboardInterrupt with the default handler
