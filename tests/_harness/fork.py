"""Run a function in an ``os.fork`` child with a hard timeout (tests of fork safety)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def in_child(tmp_path: Path, body: Callable[[], str], timeout_s: float = 20.0) -> str:
    """Run ``body`` in a forked child, which always leaves by ``os._exit`` (never through
    pytest); return what it returned, or the error it raised, as text, or "child hung" when
    it ran past ``timeout_s`` (then it is killed). The text goes through a file next to
    ``tmp_path``, not in it (tests may check that directory's contents)."""
    out = tmp_path.parent / f"{tmp_path.name}-child.txt"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        text = "no result"
        try:
            text = body()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            text = f"{type(e).__name__}: {e}"
        finally:
            try:
                out.write_text(text)
            finally:
                os._exit(0)
    deadline = time.monotonic() + timeout_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "child hung"
        time.sleep(0.02)
    return out.read_text()
