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
no bound. ``finish`` is also what a program calls to settle a checkpointer on an error path
before it ends the process group (``memopt.cli.train``): at interpreter exit the group may be
gone, and what needs it (the in-memory redundancy tier) then fails.

When it runs. If the main thread is the only non-daemon thread left, among ``threading``'s
exit callbacks (which run when the main thread returns, before any plain ``atexit``
handler, so one registered later, e.g. one that destroys the process group, cannot come
first). If other non-daemon threads are still alive (a training loop run in a thread, still
saving), not then: closing the checkpointer under that thread made its next ``save`` raise
"save after close()" and lost the saves it made after; the hook runs instead from plain
``atexit``, which Python calls after it has joined every non-daemon thread. By then
``concurrent.futures`` refuses new work (its own exit callback has run) and Python 3.12
refuses to start threads, so nothing a save needs to finish uses either: the writer, the
checksum and the redundancy tier run on threads started with the checkpointer
(``memopt._utils.workers``, the copier/writer/protector threads), and a rotated snapshot
that no thread can delete any more is deleted in line (``publish``); the background
deletions of rotated snapshots are waited for (threads started in ``atexit`` are not joined
by Python: a ``.trash-*`` directory was left). A *daemon* thread that still saves at exit is
not waited for (Python does not wait for it either).

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
from memopt.checkpoint.publish import is_deleter, wait_deletions

EXIT_WAIT_S = 120.0  # 2+ ranks: the longest the exit waits for a save to be published
_AT_EXIT = "the process is exiting without wait() or close()"
log = get_logger("memopt.checkpoint")
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_registered = False
_ran = False  # the hook ran (once: early, or from atexit)
_lock = threading.Lock()


def track(ckpt: Any) -> None:
    """Finish ``ckpt``'s saves at exit unless it is closed first (``untrack``)."""
    global _registered
    with _lock:
        _live.add(ckpt)
        if not _registered:
            atexit.register(_at_exit)  # after the non-daemon threads were joined
            register = getattr(threading, "_register_atexit", None)
            if register is not None:
                try:
                    register(_at_exit_early)  # when the main thread returns
                except RuntimeError:  # the main thread has returned already: atexit does it
                    pass
            _registered = True


def untrack(ckpt: Any) -> None:
    with _lock:
        _live.discard(ckpt)


def _forget_after_fork() -> None:
    """In a forked child: the parent's checkpointers are not this process's to finish. New
    set and lock: another thread of the parent may have held the lock at the fork."""
    global _live, _lock, _ran
    _live, _lock, _ran = weakref.WeakSet(), threading.Lock(), False


os.register_at_fork(after_in_child=_forget_after_fork)


def _others_alive() -> bool:
    """Whether a non-daemon thread other than this one and the main thread is alive (one
    that Python will join before ``atexit`` handlers run), leaving out the deletions of
    rotated snapshots (``publish``), which use no checkpointer."""
    skip = (threading.main_thread(), threading.current_thread())
    return any(
        not t.daemon and t.is_alive() and not is_deleter(t)
        for t in threading.enumerate()
        if t not in skip
    )


def _at_exit_early() -> None:
    if not _others_alive():  # else they may still use a checkpointer: ``_at_exit`` will do
        _at_exit()


def _at_exit() -> None:
    global _ran
    with _lock:
        if _ran:  # (early, then again from atexit: a wait that gave up is not repeated)
            return
        _ran = True
        live = [c for c in _live if c._pid == os.getpid()]  # (made in this process)
    for ckpt in live:
        try:
            finish(ckpt, None if ckpt.world <= 1 else EXIT_WAIT_S)
        except BaseException as e:  # noqa: BLE001 - an exit hook must not stop the others
            print(f"memopt: AsyncCheckpointer at exit: {e!r}", file=sys.stderr)
    if live:  # rotations those saves made: from atexit, Python would not wait for them
        wait_deletions()


def finish(ckpt: Any, limit: float | None, why: str = _AT_EXIT) -> bool:
    """Wait (at most ``limit`` s, None: no bound) until ``ckpt``'s saves are published, then
    close it; warn about each step (``why``: the warning's opening, saying why the saves are
    finished now). False when the wait gave up (``ckpt`` stays open)."""
    if ckpt._closed:
        return True
    steps = [j.step for j in ckpt._jobs if not j.done.is_set()]
    if steps:
        bound = "" if limit is None else f" (at most {limit:g} s: every rank must publish it)"
        warnings.warn(
            f"AsyncCheckpointer: {why}; waiting until the save of step(s) {steps} to "
            f"{ckpt.directory} is published{bound}",
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
