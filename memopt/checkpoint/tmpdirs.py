"""Who owns a ``.tmp-step_*`` directory: a lock file per temporary directory, held by its writers.

Every rank that writes into ``.tmp-step_<step>-<n>/`` first holds ``flock(LOCK_SH)`` on the
lock file ``.tmp-step_<step>-<n>.lock`` beside it (opened, locked, then checked to still be
the file at that path) and only then creates the directory; it keeps the lock until the save
is settled on every rank (published or failed: the directory is gone by then) and then
removes the lock file (``claim`` / ``release``). Several ranks hold the same shared lock.
A rank that lost contact with the others while settling a save removes its directory once no
rank holds the lock any more (``abandon``).

``clean_stale`` (rank 0, at its first save: a checkpointer that only reads never cleans)
removes a temporary directory only when it is provably nobody's: its lock file can be taken
with ``LOCK_EX`` without waiting (no live writer in any process holds it), or it has none
(left by a memopt without these locks). The directory of a save in flight in another
process (a second run in the same directory, a checkpointer opened by an evaluation job)
is left alone; it used to be deleted, and a 2-rank save was then published without rank
0's files. Where the file system has no ``flock`` nothing proves a directory stale: the
leftovers are kept, with a warning. ``.trash-*`` directories (snapshots being rotated out)
are garbage whoever made them and are always removed.

A writer also checks, after writing, that its directory is still the one it created and
holds its files (``written``): a directory removed under it (by hand, or by a process that
ignores the locks) fails the save on every rank. That check is cheap but not complete (a
directory removed and re-created may get the same inode number); the guarantee is rank 0's,
before the rename: every file each rank reported must be there with its size
(``commit._missing``), so a partial directory is never published.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from dataclasses import dataclass

from memopt._utils import get_logger, warn_once
from memopt.checkpoint import publish as P
from memopt.checkpoint.errors import CheckpointError

LOCK_SUFFIX = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
log = get_logger("memopt.checkpoint")


@dataclass
class Claim:
    """A rank's hold on a temporary directory: the locked file and the directory's identity."""

    tmp: str
    fd: int
    dir_stat: os.stat_result | None = None


def _same(path: str, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def claim(tmp: str) -> Claim:
    """Lock ``tmp``'s lock file (shared: every rank of the save holds it), then create ``tmp``."""
    lock = tmp + LOCK_SUFFIX
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a cleaner decides (moments)
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            warn_once(f"AsyncCheckpointer: cannot lock files in {os.path.dirname(tmp)} "
                      f"({e.strerror}): temporary directories of crashed saves there are "
                      "kept (nothing proves them stale); remove .tmp-step_* by hand when no "
                      "save is running")  # fmt: skip
            break
        if _same(lock, fd):  # (else a cleaner removed it between our open and our lock)
            break
        os.close(fd)
    else:
        raise OSError(errno.EBUSY, f"the lock file {lock} keeps being replaced")
    out = Claim(tmp, fd)
    try:
        os.makedirs(tmp, exist_ok=True)
        out.dir_stat = os.stat(tmp)
    except BaseException:
        release(out)
        raise
    return out


def written(c: Claim, names: tuple[str, ...], step: int, rank: int) -> dict[str, int]:
    """The sizes of this rank's files in ``c.tmp``, after checking that the directory is still
    the one ``claim`` created and holds them; ``CheckpointError`` otherwise."""
    what = f"the temporary directory {c.tmp} was removed while rank {rank} wrote into it"
    try:
        if c.dir_stat is None or not os.path.samestat(os.stat(c.tmp), c.dir_stat):
            raise FileNotFoundError(c.tmp)
        what = f"rank {rank}'s files vanished from {c.tmp} right after it wrote them"
        return {n: os.stat(os.path.join(c.tmp, n)).st_size for n in names}
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint step {step}: {what} (by hand, or by a process that does not honour "
            f"its lock file {c.tmp + LOCK_SUFFIX}); the save is not published and published "
            "snapshots are untouched"
        ) from None


def release(c: Claim | None, unlink: bool = True) -> None:
    """Give the lock up and remove the lock file (when it is still ours and ``unlink``)."""
    if c is None or c.fd < 0:
        return
    lock = c.tmp + LOCK_SUFFIX
    try:
        if unlink and _same(lock, c.fd):
            os.unlink(lock)
    except FileNotFoundError:  # (another rank of the save removed it first)
        pass
    finally:  # (unlocked explicitly: a child forked meanwhile shares the descriptor)
        try:
            fcntl.flock(c.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # (a file system without flock: nothing was held)
        os.close(c.fd)
        c.fd = -1


def abandon(root: str, c: Claim | None) -> None:
    """Let go of a save this rank lost contact over (``commit.LostContact``): remove its
    temporary directory when no other rank holds the lock any more (they settled, died, or
    gave up too: the last to let go removes it), else leave it to the rank still holding it
    (it publishes or removes it). Before, the directory (a full rank file per rank) stayed
    until a later save in the same directory cleaned it. Removing only this rank's files
    could race rank 0's rename of a directory it is still publishing: the lock says when
    nobody is."""
    if c is None or c.fd < 0:
        return
    removed = False
    try:
        for _ in range(2):  # (a rank letting go at the same moment holds it: one of us wins)
            try:
                fcntl.flock(c.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(c.fd, fcntl.LOCK_UN)
                continue
            if _same(c.tmp + LOCK_SUFFIX, c.fd):  # (else removed with the directory already)
                _discard_tmp(root, c.tmp)
                removed = True
            break
    except OSError as e:  # no flock here (nothing proves the others done), or the rename
        if e.errno not in _NO_FLOCK:
            warn_once(f"AsyncCheckpointer: cannot remove {c.tmp} of a save that failed: {e}; "
                      "remove it by hand (the next save in this directory does too)")  # fmt: skip
    release(c, unlink=removed)  # (a lock file another rank still holds stays: it is theirs)


def clean_stale(root: str) -> None:
    """Remove the temporary directories nobody holds and every trash directory (see above).
    A failure here is a warning: leftovers cost disk space, not the save that cleans."""
    kept = []
    try:
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.startswith(".trash-"):
                P.delete_later(path)
            elif name.startswith(".tmp-step_") and not name.endswith(LOCK_SUFFIX):
                if not _remove_if_stale(root, path):
                    kept.append(name)
            elif name.startswith(".tmp-step_") and not os.path.lexists(path[: -len(LOCK_SUFFIX)]):
                _remove_if_stale(root, path[: -len(LOCK_SUFFIX)])  # a lock file left alone
    except OSError as e:
        warn_once(f"AsyncCheckpointer: cannot remove the leftovers of crashed saves in {root}: "
                  f"{e}; remove stale .tmp-step_* and .trash-* there by hand")  # fmt: skip
    if kept:
        log.info("checkpoint: kept %s in %s (a save in another process holds it)", kept, root)


def _remove_if_stale(root: str, tmp: str) -> bool:
    """Remove ``tmp`` (and its lock file) when no writer holds its lock; True when removed."""
    lock = tmp + LOCK_SUFFIX
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)  # (NFS emulates flock with fcntl
        # locks: an exclusive one needs the file open for writing)
    except FileNotFoundError:  # no lock file: not a writer of this version's
        _discard_tmp(root, tmp)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live save holds it
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            warn_once(f"AsyncCheckpointer: cannot lock files in {root} ({e.strerror}): "
                      f"{os.path.basename(tmp)} is kept (it may be a live save's)")  # fmt: skip
            return False
        if not _same(lock, fd):
            return False  # replaced meanwhile: look again at the next start
        _discard_tmp(root, tmp)  # (while holding the lock: a writer waiting on it retries)
        os.unlink(lock)
        return True
    finally:
        os.close(fd)


def _discard_tmp(root: str, tmp: str) -> None:
    """Rename to trash (atomic), delete in the background: a crashed save's files may be GBs,
    and the first save of the run, whose writer thread cleans, need not wait for them."""
    trash = os.path.join(root, f".trash-{uuid.uuid4().hex}")
    try:
        os.rename(tmp, trash)
    except FileNotFoundError:
        return
    P.delete_later(trash)
