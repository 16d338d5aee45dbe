"""The NVMe tier's one preallocated file per rank: config, open with O_DIRECT probe, growth.

``open_swap_file`` opens ``<directory>/memopt-rank<r>.swap`` once (``O_RDWR | O_CREAT`` plus
``O_DIRECT`` unless turned off), checks the free space with ``statvfs`` (a clear ENOSPC
before touching the disk, instead of a half-filled device), preallocates it with
``posix_fallocate``, and probes O_DIRECT by writing and reading back one aligned page: a
filesystem that refuses O_DIRECT (EINVAL at open or at the first I/O) is detected here, not
in the middle of a training step. With ``direct="required"`` (the default) that is an
``OSError`` naming the directory and the two ways out; with ``direct="prefer"`` it is one
warning and buffered I/O (the page cache then holds a copy of everything written); with
``direct="off"`` buffered I/O is used silently.

A swap file is claimed before anything touches it: opened without truncation and locked
with ``flock(LOCK_EX | LOCK_NB)``; only the file this tier holds is probed, truncated and
preallocated. Several tiers may share a directory (optimizer state and stage-3 parameter
shards under one ``nvme_path``; two runs launched from one recipe; ranks of an ``mp.spawn``
run): a name another open tier of this process or another process holds is never opened
for writing; the next free name (``memopt-rank<r>-1.swap``, ...) is taken instead (logged),
and ``close_swap_file`` removes only the file its tier holds (still locked) and gives the
name back. A file left by a process that died is no longer locked and is reused.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import resource
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memopt._utils import get_logger, warn_once

__all__ = [
    "NVMeConfig", "SwapFile", "close_swap_file", "grow_swap_file", "open_swap_file",
    "release_swap_file",
]  # fmt: skip

DirectMode = Literal["required", "prefer", "off"]
_ALIGN = 4096
_IN_USE: set[Path] = set()  # swap files open in this process (resolved paths)
_IN_USE_LOCK = threading.Lock()
_ERRNAME = errno.errorcode.get
_log = get_logger(__name__)


@dataclass(frozen=True)
class NVMeConfig:
    """Where and how the NVMe tier stores bytes.

    directory: a directory on the NVMe device (created if missing).
    capacity_bytes: preallocated at open; the file grows by ``grow_bytes`` when full
        (0: never grows; a full file raises ENOSPC).
    block_size / queue_depth: I/O request size and requests in flight (measured defaults:
        see docs/offload.md).
    direct: O_DIRECT policy: "required" raises on a filesystem without it, "prefer" falls
        back to buffered I/O with a warning, "off" never uses it.
    rank: names the file (default: the RANK environment variable, else the
        torch.distributed rank when a process group is initialized, else 0).
    keep_file: leave the file on close (default: removed; the tier is scratch space).
    """

    directory: str | os.PathLike[str]
    capacity_bytes: int = 1 << 30
    grow_bytes: int = 256 << 20
    block_size: int = 1 << 20
    queue_depth: int = 8
    direct: DirectMode = "required"
    rank: int | None = None
    keep_file: bool = False

    def __post_init__(self) -> None:
        for name in ("capacity_bytes", "grow_bytes"):
            v = getattr(self, name)
            if v < 0 or v % _ALIGN:
                raise ValueError(f"NVMeConfig.{name} must be >= 0 and a multiple of 4096, got {v}")
        if self.block_size < _ALIGN or self.block_size % _ALIGN:
            raise ValueError(
                f"NVMeConfig.block_size must be a multiple of 4096, got {self.block_size}"
            )
        if self.queue_depth < 1:
            raise ValueError(f"NVMeConfig.queue_depth must be >= 1, got {self.queue_depth}")
        if self.direct not in ("required", "prefer", "off"):
            raise ValueError(f"NVMeConfig.direct must be required/prefer/off, not {self.direct!r}")

    def path(self) -> Path:
        rank = self.rank if self.rank is not None else _default_rank()
        return Path(self.directory) / f"memopt-rank{rank}.swap"


def _default_rank() -> int:
    """``$RANK``, else the initialized process group's rank (``mp.spawn`` sets no RANK)."""
    env = os.environ.get("RANK", "").strip()
    if env:
        return int(env)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@dataclass
class SwapFile:
    path: Path
    fd: int
    direct: bool
    size: int


def _check_free_space(st: os.statvfs_result, directory: Path, nbytes: int, what: str,
                      fix: str) -> None:
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise OSError(
            errno.ENOSPC,
            f"NVMe tier: {what} needs {nbytes} bytes but {directory} has {free} free; free "
            f"space there, or {fix}",
        )


def _fallocate(swap: SwapFile, offset: int, nbytes: int, what: str, fix: str) -> None:
    """``posix_fallocate`` that fails with the path, the bytes and the way out (errno kept):
    the statvfs check does not make it safe (filesystem metadata, another writer taking the
    space in between, a file size limit)."""
    try:
        os.posix_fallocate(swap.fd, offset, nbytes)
    except OSError as err:
        if err.errno == errno.EFBIG:
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
            why = (
                "the file would pass the largest file this process may write (RLIMIT_FSIZE, "
                f"`ulimit -f`: {shown}) or the filesystem allows: raise that limit, or {fix}"
            )
        elif err.errno in (errno.ENOSPC, errno.EDQUOT):
            why = (
                "the filesystem ran out of room although statvfs showed enough (it needs "
                "blocks for its own metadata too, or another writer took the space "
                f"meanwhile): free space on that disk, or {fix}"
            )
        else:
            why = (
                f"the filesystem holding {swap.path.parent} refused it: check that disk, or "
                "put NVMeConfig.directory on another one"
            )
        raise OSError(
            err.errno,
            f"NVMe tier: {what}: posix_fallocate of {nbytes} bytes at offset {offset} of "
            f"{swap.path} failed ({_ERRNAME(err.errno or 0, '?')}: {err.strerror}); {why}",
        ) from err


def _unusable_directory(directory: Path, err: OSError) -> OSError:
    """The error of creating ``directory`` or a swap file in it, with the setting and a fix
    (errno kept, so PermissionError stays a PermissionError)."""
    code = err.errno
    if code == errno.EROFS:
        fix = "its filesystem is mounted read-only: use a directory on a writable disk"
    elif code in (errno.EACCES, errno.EPERM):
        fix = (
            f"this process (uid {os.getuid()}) may not write there: use a directory it can "
            "write, or change that directory's owner or mode"
        )
    elif code in (errno.ENOTDIR, errno.EEXIST):
        fix = "a file stands where a directory is needed: name a directory (made if missing)"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        fix = "that disk (or this user's quota) is full: free space there or use another disk"
    else:
        fix = "use a directory on a local disk this process can write"
    at = f" on {err.filename}" if err.filename and Path(err.filename) != directory else ""
    return OSError(
        code,
        f"NVMe tier: cannot make its swap file in {directory} ({_ERRNAME(err.errno or 0, '?')}: "
        f"{err.strerror}{at}); that directory is NVMeConfig.directory (set by "
        "OffloadConfig.nvme_path or nvme=, memopt.shard(param_nvme=), ActivationOptions(nvme=), "
        f"or the config's *.nvme_path): {fix}",
    )


def _open_file(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.EINVAL and flags & getattr(os, "O_DIRECT", 0):
            raise  # O_DIRECT refused: the caller falls back or explains
        raise _unusable_directory(path.parent, err) from err


def _probe_direct(fd: int) -> None:
    """Write and read back one aligned page at offset 0 (raises what O_DIRECT raises)."""
    page = mmap.mmap(-1, _ALIGN)
    try:
        os.pwrite(fd, page, 0)
        os.preadv(fd, [page], 0)
    finally:
        page.close()


def _no_direct(config: NVMeConfig, path: Path, err: OSError) -> None:
    msg = (
        f"NVMe tier: the filesystem holding {path} does not support O_DIRECT ({err.strerror}); "
        "put NVMeConfig.directory on a disk filesystem (ext4, xfs), or pass direct='prefer' "
        "to fall back to buffered I/O"
    )
    if config.direct == "required":
        raise OSError(errno.EINVAL, msg) from err
    warn_once(msg.replace("or pass direct='prefer' to fall back", "falling back") + ".")


def _lock(fd: int, path: Path) -> bool | None:
    """Take ``flock(LOCK_EX | LOCK_NB)`` on ``fd``: True when this process now holds the file
    at ``path``, False when another process holds it, None when the file at ``path`` is no
    longer the one opened (its holder removed it between our open and our lock: try again)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # a filesystem without flock (some FUSE / NFS setups)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        warn_once(
            f"NVMe tier: cannot lock swap files in {path.parent} ({err.strerror}); two "
            "processes must not use one NVMeConfig.directory with the same rank there"
        )
        return True
    try:
        return True if os.path.samestat(os.stat(path), os.fstat(fd)) else None
    except FileNotFoundError:
        return None


def _open_locked(config: NVMeConfig, path: Path) -> tuple[int, bool, OSError | None] | None:
    """(fd, O_DIRECT, EINVAL of an O_DIRECT open) of ``path`` opened (never truncated) and
    locked, or None when another process holds it."""
    base = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        direct, refused, fd = config.direct != "off" and hasattr(os, "O_DIRECT"), None, -1
        if direct:
            try:
                fd = _open_file(path, base | os.O_DIRECT)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                direct, refused = False, err
        if fd < 0:
            fd = _open_file(path, base)
        try:
            held = _lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if held:
            return fd, direct, refused
        os.close(fd)
        if held is False:
            return None
    raise OSError(errno.EBUSY, f"NVMe tier: {path} keeps being replaced; cannot claim it")


def _claim(config: NVMeConfig) -> tuple[Path, int, bool, OSError | None]:
    """The rank's file name, or the first ``-<n>`` variant that neither an open tier of this
    process nor another process (``flock``) holds: opened and locked, not yet truncated."""
    first, n, busy = config.path(), 0, []
    while True:
        path = first if n == 0 else first.with_name(f"{first.stem}-{n}{first.suffix}")
        n += 1
        with _IN_USE_LOCK:
            if path.resolve() in _IN_USE:
                continue
            _IN_USE.add(path.resolve())
        try:
            opened = _open_locked(config, path)
        except BaseException:
            _forget(path)
            raise
        if opened is None:
            _forget(path)
            busy.append(path.name)
            continue
        if busy:
            _log.warning(
                "NVMe tier: %s held by another process (same NVMeConfig.directory and rank); "
                "this tier uses %s",
                ", ".join(busy), path,
            )  # fmt: skip
        elif path != first:
            _log.info("NVMe tier: %s is held by another tier of this process; using %s",
                      first, path)  # fmt: skip
        return (path, *opened)


def _forget(path: Path) -> None:
    with _IN_USE_LOCK:
        _IN_USE.discard(path.resolve())


def release_swap_file(swap: SwapFile) -> None:
    """Let a later tier of this process reuse ``swap``'s file name (call after closing it)."""
    _forget(swap.path)


def _unlink_if_ours(swap: SwapFile) -> None:
    """Remove ``swap.path`` if it still names the file ``swap.fd`` holds (someone may have
    removed it, and another process made a new one of that name)."""
    try:
        if os.path.samestat(os.stat(swap.path), os.fstat(swap.fd)):
            swap.path.unlink()
    except FileNotFoundError:
        pass


def close_swap_file(swap: SwapFile, keep: bool) -> None:
    """Remove the file (unless ``keep``) while still holding its lock, close it and give its
    name back; a second call does nothing."""
    if swap.fd < 0:
        return
    try:
        if not keep:
            _unlink_if_ours(swap)
    finally:
        fd, swap.fd = swap.fd, -1
        try:
            os.close(fd)
        finally:
            release_swap_file(swap)


def open_swap_file(config: NVMeConfig) -> SwapFile:
    """Claim (lock), preallocate and probe the rank's swap file."""
    directory = Path(config.directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unusable_directory(directory, err) from err
    path, fd, direct, refused = _claim(config)
    swap = SwapFile(path=path, fd=fd, direct=direct, size=0)
    try:
        _prepare(config, directory, swap, refused)
    except BaseException:
        close_swap_file(swap, keep=False)
        raise
    return swap


def _prepare(config: NVMeConfig, directory: Path, swap: SwapFile, refused: OSError | None) -> None:
    """On the locked file: settle O_DIRECT (probe), then truncate and preallocate."""
    if refused is not None:
        _no_direct(config, swap.path, refused)
    elif swap.direct:
        try:
            _probe_direct(swap.fd)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            _no_direct(config, swap.path, err)
            flags = fcntl.fcntl(swap.fd, fcntl.F_GETFL)
            fcntl.fcntl(swap.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            swap.direct = False
    os.ftruncate(swap.fd, 0)
    what = "preallocating the swap file"
    fix = "lower NVMeConfig.capacity_bytes (the file then grows by grow_bytes as it fills)"
    _check_free_space(os.statvfs(directory), directory, config.capacity_bytes, what, fix)
    if config.capacity_bytes:
        _fallocate(swap, 0, config.capacity_bytes, what, fix)
    swap.size = config.capacity_bytes


def grow_swap_file(swap: SwapFile, nbytes: int, needed: int | None = None) -> None:
    """Preallocate ``nbytes`` more at the end of the file for a request of ``needed`` bytes:
    a clear ENOSPC / EFBIG naming the file and the fix when the disk cannot, and then the
    file keeps its size (a partial allocation is given back). The free space is asked of the
    open file (``fstatvfs``): a directory removed meanwhile (a tmp cleaner) does not matter."""
    needed = nbytes if needed is None else needed
    if needed < nbytes:
        fix = (
            "lower NVMeConfig.grow_bytes (the file grows by max(grow_bytes, the request); "
            f"this request needs {needed} bytes)"
        )
    else:
        fix = f"move NVMeConfig.directory to a disk with room (one request needs {needed} bytes)"
    what = f"growing {swap.path} past {swap.size} bytes"
    _check_free_space(os.fstatvfs(swap.fd), swap.path.parent, nbytes, what, fix)
    try:
        _fallocate(swap, swap.size, nbytes, what, fix)
    except OSError:
        try:  # a partial allocation past the slots' end holds disk space nothing uses
            os.ftruncate(swap.fd, swap.size)
        except OSError:
            pass
        raise
    swap.size += nbytes
