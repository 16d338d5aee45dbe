"""The snapshot directory: temporary directories, atomic publication, rotation, discovery.

``directory/step_<10 digits>/`` is a published snapshot: it appears by one ``rename`` of a
``.tmp-step_...`` directory after every rank's files and the manifest were written and
fsynced (files, then the directory), so a reader never sees a partial one. Rotation and
replacement first rename a snapshot to ``.trash-...`` (atomic), then delete it: a crash in the
middle leaves a trash directory (removed by the next run's first save), never a half-deleted
snapshot that looks published. The deletion itself runs in a background thread, after the new
snapshot is published (``_discard``).

Only names in memopt's exact format (``step_`` and the step zero-padded to 10 digits) are
snapshots: every path is rebuilt from the step number, so a hand-named ``step_5`` would be
listed but never found. Such names are foreign: ignored by ``latest()``, ``load()`` and
rotation, with a warning naming them. A listing that races with a rotation (a listed step
renamed to trash before its manifest was checked, the newer one published after the
``listdir``) is taken again (``RELISTS``), so a reader never sees an empty directory while
a snapshot exists at every moment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from typing import Any

from memopt._utils import get_logger
from memopt.checkpoint.fileformat import fsync_dir

MANIFEST = "manifest.json"
_STEP = re.compile(r"^step_(\d+)$")
log = get_logger("memopt.checkpoint")


RELISTS = 20  # listings taken while listed snapshots vanish (rotation) before giving up


def step_name(step: int) -> str:
    return f"step_{step:010d}"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, step_name(step))


def tmp_dir(root: str, step: int, seq: int, run: str) -> str:
    """The temporary directory of save number ``seq`` (of step ``step``) of the run ``run``."""
    return os.path.join(root, f".tmp-step_{step:010d}-{seq}-{run}")


def rank_files(rank: int) -> tuple[str, str]:
    return f"rank_{rank:05d}.safetensors", f"rank_{rank:05d}.json"


def published_steps(root: str) -> list[int]:
    """Steps with a published snapshot, ascending (listed again while one vanishes under the
    listing; foreign names are warned about: see the module docstring)."""
    for attempt in range(RELISTS):
        steps, foreign, vanished = _scan(root)
        if not vanished:
            break
        time.sleep(0.001 * attempt)  # (a same-step replacement: renamed out, then in)
    if foreign and (key := (root, tuple(foreign))) not in _foreign_seen:  # (rotation lists
        _foreign_seen.add(key)  # at every save: once per directory and set of names)
        warnings.warn(foreign_message(root, foreign), stacklevel=3)
        log.warning("checkpoint: %s", foreign_message(root, foreign))
    return steps


_foreign_seen: set[tuple[str, tuple[str, ...]]] = set()


def foreign_names(root: str) -> list[str]:
    """``step_<digits>`` snapshot directories whose name is not memopt's format."""
    return _scan(root)[1]


def foreign_message(root: str, names: list[str]) -> str:
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return (
        f"checkpoint directory {root}: ignoring {shown}: a snapshot directory must be named "
        "step_ plus its step zero-padded to 10 digits (e.g. step_0000000005); latest(), "
        "load() and keep= rotation skip these. Rename one to step_<10 digits> to use it, or "
        "open it directly with Snapshot(path) / export_hf(path, ...)"
    )


def _scan(root: str) -> tuple[list[int], list[str], bool]:
    """(published steps, foreign snapshot names, whether a listed step vanished meanwhile)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return [], [], False
    steps, foreign, vanished = [], [], False
    for name in names:
        m = _STEP.match(name)
        if not m:
            continue
        path = os.path.join(root, name)
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            vanished = vanished or not os.path.lexists(path)
        elif name == step_name(int(m.group(1))):
            steps.append(int(m.group(1)))
        else:
            foreign.append(name)
    return sorted(steps), sorted(foreign), vanished


def write_json(path: str, obj: Any, fsync: bool) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return data


_deleting: dict[threading.Thread, str] = {}  # live deletions -> the snapshot directory
_delete_lock = threading.Lock()  # held while deleting
_list_lock = threading.Lock()  # guards _deleting


def _remove(trash: str) -> None:
    with _delete_lock:  # one deletion at a time: they compete for the disk otherwise
        shutil.rmtree(trash, ignore_errors=True)


def delete_later(trash: str) -> None:
    """Delete ``trash`` (a directory nobody reads any more) in a background thread; in line
    where no thread can be started (Python 3.12 once the main thread has returned: a save
    finished by a training thread or the exit hook then).

    The thread is not a daemon (``daemon=False`` said explicitly: a thread inherits the flag
    of the thread that starts it, and rotations start these from the daemon writer thread,
    so an exit right after ``close()`` used to cut them short and leave ``.trash-*``)."""
    t = threading.Thread(target=_remove, args=(trash,), name="memopt-ckpt-rm", daemon=False)
    try:
        t.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown"
        _remove(trash)
        return
    with _list_lock:
        for done in [d for d in _deleting if not d.is_alive()]:
            del _deleting[done]
        _deleting[t] = os.path.dirname(trash)


def _discard(root: str, path: str) -> None:
    """Rename ``path`` to a trash name (atomic), then delete it in a background thread.

    Deleting a GB-sized file costs a few hundred ms where the file system discards (TRIMs)
    the freed blocks; the snapshot that replaced it is durable already, so that time is
    kept off the save's path. The threads are not daemons: the interpreter lets them finish
    (and ``close()`` waits for those in its directory); a crash leaves the trash directory,
    removed by ``tmpdirs.clean_stale`` at the next save."""
    trash = os.path.join(root, f".trash-{uuid.uuid4().hex}")
    os.rename(path, trash)
    delete_later(trash)


def is_deleter(thread: threading.Thread) -> bool:
    """Whether ``thread`` is one of these deletions (it never touches a checkpointer)."""
    with _list_lock:
        return thread in _deleting


def wait_deletions(root: str | None = None) -> None:
    """Block until every background deletion of rotated snapshots (in ``root``; None: in
    any directory) has finished."""
    with _list_lock:
        threads = [t for t, where in _deleting.items() if root is None or where == root]
    for t in threads:
        t.join()


def publish(root: str, tmp: str, step: int, fsync: bool) -> str:
    """Rename ``tmp`` to the step's directory (replacing an older save of the same step)."""
    if fsync:
        fsync_dir(tmp)
    target = step_dir(root, step)
    if os.path.exists(target):
        _discard(root, target)
    os.rename(tmp, target)
    if fsync:
        fsync_dir(root)
    return target


def rotate(root: str, keep: int, step: int) -> tuple[list[int], list[int]]:
    """After publishing ``step``: remove all but the newest ``keep`` snapshots of steps up to
    ``step`` (so never ``step`` itself). Returns ``(removed, later)``: snapshots of later
    steps (an earlier run in a reused directory, or the branch a rollback left) are not this
    run's to delete and are left alone; the caller warns about them."""
    steps = published_steps(root)
    mine = [s for s in steps if s <= step]
    gone = mine[:-keep] if len(mine) > keep else []
    for s in gone:
        _discard(root, step_dir(root, s))
        log.info("checkpoint: rotated out step %d", s)
    return gone, [s for s in steps if s > step]


def later_steps_message(root: str, job: Any) -> str:
    """The warning for a save whose directory holds snapshots of later steps."""
    later = job.later_steps
    shown = ", ".join(str(s) for s in later[:8]) + (", ..." if len(later) > 8 else "")
    return (
        f"AsyncCheckpointer: {root} holds snapshots of steps later than step {job.step} "
        f"just saved: [{shown}] (an earlier run in this directory, or the steps after the "
        "one a resume rolled back to). They are kept (not this run's to delete) and keep= "
        f"counts only steps up to {job.step}, but latest() returns {later[-1]} and "
        "load() without a step loads it (or falls back from it) instead of this run's "
        "newest snapshot. Move or delete those step_* directories if they are not wanted, "
        "or save into another directory"
    )


def check_directory(where: str) -> None:
    """Create the checkpoint directory if missing; a clear error when it cannot hold one."""
    if os.path.exists(where) and not os.path.isdir(where):
        raise NotADirectoryError(
            f"AsyncCheckpointer: the checkpoint directory {where} is an existing file; pass "
            "a directory (it is created when missing)"
        )
    try:
        os.makedirs(where, exist_ok=True)
    except OSError as e:
        kind = PermissionError if isinstance(e, PermissionError) else OSError
        raise kind(f"AsyncCheckpointer: cannot create the checkpoint directory {where}: {e}") from e
    if not os.access(where, os.W_OK | os.X_OK):
        raise PermissionError(
            f"AsyncCheckpointer: the checkpoint directory {where} is not writable by this "
            "process; pass a directory you can write to"
        )
