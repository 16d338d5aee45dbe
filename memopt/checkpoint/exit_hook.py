"""Saves still in flight when the interpreter exits without ``wait()``/``close()``.

Every open ``AsyncCheckpointer`` is tracked by a weak reference (the hook never keeps one
alive). When the interpreter exits (the end of the script, an uncaught exception, ``sys.exit``
from a SIGTERM handler) the hook warns, waits until the unfinished saves are published, and
closes the checkpointer, so its threads stop before the interpreter finalizes (the copier and
writer are daemon threads: left running inside native code, they could abort the process).

The wait is bounded on 2+ ranks (``EXIT_WAIT_S``): publication is collective, and a rank that
never publishes (a hung peer, or one that left without saving) would hold the exit forever.
Past the bound the save is left unpublished, with a warning, and the checkpointer is not
closed (its writer is inside the collective). On one process only the disk can hold it up:
no bound. The hook runs among ``threading``'s exit callbacks, before non-daemon threads are
joined and before ``concurrent.futures`` refuses new work (the writer's thread-pool engine
needs it), where that private hook exists; else from ``atexit``.

A forked child (a DataLoader worker: ``multiprocessing`` children run ``threading``'s exit
callbacks too) finishes nothing: the saves, threads and process group are the parent's
(``forked``). The child forgets every tracked checkpointer at the fork, and the hook skips
any made in another process (a fork that bypassed ``os.register_at_fork``).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any

from memopt._utils import get_logger
from memopt.checkpoint.errors import CheckpointError

EXIT_WAIT_S = 120.0  # 2+ ranks: the longest the exit waits for a save to be published
log = get_logger("memopt.checkpoint")
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_registered = False
_lock = threading.Lock()


def track(ckpt: Any) -> None:
    """Finish ``ckpt``'s saves at exit unless it is closed first (``untrack``)."""
    global _registered
    with _lock:
        _live.add(ckpt)
        if not _registered:
            register = getattr(threading, "_register_atexit", None)
            try:
                (register or atexit.register)(_at_exit)
            except RuntimeError:  # the interpreter is already shutting down
                atexit.register(_at_exit)
            _registered = True


def untrack(ckpt: Any) -> None:
    with _lock:
        _live.discard(ckpt)


def _forget_after_fork() -> None:
    """In a forked child: the parent's checkpointers are not this process's to finish. New
    set and lock: another thread of the parent may have held the lock at the fork."""
    global _live, _lock
    _live, _lock = weakref.WeakSet(), threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _at_exit() -> None:
    with _lock:
        live = [c for c in _live if c._pid == os.getpid()]  # (made in this process)
    for ckpt in live:
        try:
            finish(ckpt, None if ckpt.world <= 1 else EXIT_WAIT_S)
        except BaseException as e:  # noqa: BLE001 - an exit hook must not stop the others
            print(f"memopt: AsyncCheckpointer at exit: {e!r}", file=sys.stderr)


def finish(ckpt: Any, limit: float | None) -> bool:
    """Wait (at most ``limit`` s, None: no bound) until ``ckpt``'s saves are published, then
    close it; warn about each step. False when the wait gave up (``ckpt`` stays open)."""
    if ckpt._closed:
        return True
    steps = [j.step for j in ckpt._jobs if not j.done.is_set()]
    if steps:
        bound = "" if limit is None else f" (at most {limit:g} s: every rank must publish it)"
        warnings.warn(
            f"AsyncCheckpointer: the process is exiting without wait() or close(); waiting "
            f"until the save of step(s) {steps} to {ckpt.directory} is published{bound}",
            stacklevel=2,
        )
    if not _wait(ckpt, None if limit is None else time.monotonic() + limit):
        left = [j.step for j in ckpt._jobs if not j.done.is_set()]
        warnings.warn(
            f"AsyncCheckpointer: exiting with the save of step(s) {left} NOT published (the "
            f"ranks did not finish it within {limit:g} s); call wait() or close() before "
            "exiting to keep the last save",
            stacklevel=2,
        )
        return False
    try:
        ckpt.close()
    except CheckpointError as e:
        warnings.warn(f"AsyncCheckpointer: at exit: {e}", stacklevel=2)
    else:
        if steps:
            log.info("checkpoint: published step(s) %s at exit", steps)
    return True


def _wait(ckpt: Any, deadline: float | None) -> bool:
    """Block until every save (and the peers' protection of it) finished, or ``deadline``."""
    for job in list(ckpt._jobs):
        if not job.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            return False
    peers = ckpt.peers
    while peers is not None and peers.busy():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
