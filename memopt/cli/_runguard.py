"""Keeping one ``memopt run`` per checkpoint directory, and no rank alive after its launcher.

Two hazards of a launch (sweep29 F2/F3): torchrun starts every rank in a session of its own,
so a rank outlives a ``kill -9`` of the launcher's process group and goes on training and
writing snapshots; a re-run of the same command then trains into the same
``checkpoint.directory`` at the same time, silently (both resume, rotate and publish there).

- ``die_with_parent()`` (Linux): the rank asks the kernel for SIGTERM when its parent, the
  torchrun agent, dies (``prctl(PR_SET_PDEATHSIG)``). The kernel sends it when the *thread*
  that forked the rank exits; torchrun's agent starts the ranks from its main thread
  (``SubprocessContext._start`` under ``LocalElasticAgent.run``), whose exit is the process's.
  A parent that died before the request (the rank's start-up takes seconds) is caught by
  comparing the parent pid with the one ``memopt run`` exported (``PARENT_ENV``: the launcher
  replaces itself with torchrun, so its pid is torchrun's).
- ``hold(directory)``: an advisory ``fcntl.flock`` on ``directory/LOCK_NAME``, held by rank 0
  for the whole run; the kernel drops it when the process ends, however it ends. A second
  holder fails at once with ``DirectoryInUseError`` naming the directory and the holder's pid,
  host and command (written into the file once locked). ``probe(directory)`` is the
  launcher's early check: lock and release at once. A filesystem without ``flock`` (some
  network ones) gets a warning and no lock.
- ``hold(directory, until_exit=True)`` (a rank of ``memopt run``): the end of the block does
  not release the lock; the end of the process does. A training loop that raises (or is
  interrupted) leaves its last asynchronous save to the checkpoint exit hook, which publishes
  it at interpreter exit; released at the block's end, the lock was free during that save, and
  a re-run could take it and write the same directory alongside it. The kernel drops a flock
  when the process's last descriptor of it closes, after every ``atexit`` handler has run,
  whatever order they were registered in.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # (not POSIX)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".memopt-run.lock"
#: Set by ``memopt run`` to its pid (torchrun's after the exec), read by the ranks.
PARENT_ENV = "MEMOPT_RUN_PARENT_PID"
_PR_SET_PDEATHSIG = 1
#: errno values of a filesystem that cannot ``flock`` (as opposed to "held by another").
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class DirectoryInUseError(RuntimeError):
    """``checkpoint.directory`` is held by another live run."""


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Under a torchrun agent on Linux, have the kernel send ``sig`` to this process when its
    parent dies; True when requested. ``SystemExit`` when the parent ``memopt run`` started
    is already gone (the rank would train unsupervised)."""
    if not sys.platform.startswith("linux") or not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False  # (a rank started by hand keeps running after its shell, as before)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    expected = os.environ.get(PARENT_ENV, "")
    if expected.isdigit() and os.getppid() != int(expected):
        raise SystemExit(
            f"memopt.cli.train: the launcher (torchrun, pid {expected}) exited before this rank "
            f"(pid {os.getpid()}) started; stopping instead of training without it"
        )
    return True


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its pid yet"


def _lock(directory: str) -> int | None:
    """An fd holding the lock on ``directory``; None when the filesystem cannot lock."""
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DirectoryInUseError(
            f"checkpoint.directory {directory} is in use by another run: {holder} holds its "
            f"lock ({path}). Two runs in one directory would resume from, rotate and publish "
            "each other's snapshots. Stop that run first (after a killed launcher look for "
            "leftover `python -m memopt.cli.train` processes), or pass another "
            "checkpoint.directory"
        ) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _UNSUPPORTED:
            raise
        warnings.warn(
            f"memopt run: cannot lock {path} ({e.strerror}: a filesystem without flock); a "
            "second run in this checkpoint.directory would not be detected",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return fd


@contextlib.contextmanager
def hold(directory: str | None, *, until_exit: bool = False) -> Iterator[None]:
    """Hold ``directory``'s run lock for the ``with`` block (nothing for no directory, or
    off POSIX). ``DirectoryInUseError`` when another process holds it. ``until_exit``: keep it
    past the block, until this process ends (for a process that exits after the block: a
    second ``hold`` of the directory in this process would be refused)."""
    if not directory or fcntl is None:
        yield
        return
    directory = os.path.abspath(directory)
    fd = _lock(directory)
    if fd is None:
        yield
        return
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        note = (f"pid {os.getpid()} on host {socket.gethostname()} (since {since}: "
                f"{' '.join(sys.argv)[:300]})")  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode() + b"\n", 0)
        yield
    finally:
        if not until_exit:  # (else the process's exit closes it, after the exit hooks)
            os.close(fd)  # (releases the lock; the file stays: unlinking it would race a waiter)


def probe(directory: str | None) -> None:
    """``DirectoryInUseError`` now if ``directory`` is held (the launcher's early check)."""
    if not directory or fcntl is None or not os.path.isdir(directory):
        return
    fd = _lock(os.path.abspath(directory))
    if fd is not None:
        os.close(fd)


__all__ = ["LOCK_NAME", "PARENT_ENV", "DirectoryInUseError", "die_with_parent", "hold", "probe"]
