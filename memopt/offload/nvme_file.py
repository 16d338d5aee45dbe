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

Several tiers of one process may share a directory (optimizer state and stage-3 parameter
shards under one ``nvme_path``): a path another open tier of this process holds is never
truncated; the next free name (``memopt-rank<r>-1.swap``, ...) is taken instead, and
``release_swap_file`` gives the name back when its tier closes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memopt._utils import warn_once

__all__ = ["NVMeConfig", "SwapFile", "grow_swap_file", "open_swap_file", "release_swap_file"]

DirectMode = Literal["required", "prefer", "off"]
_ALIGN = 4096
_IN_USE: set[Path] = set()  # swap files open in this process (resolved paths)
_IN_USE_LOCK = threading.Lock()


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
    rank: names the file (default: the RANK environment variable, else 0).
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
        rank = self.rank if self.rank is not None else int(os.environ.get("RANK", "0"))
        return Path(self.directory) / f"memopt-rank{rank}.swap"


@dataclass
class SwapFile:
    path: Path
    fd: int
    direct: bool
    size: int


def _check_free_space(directory: Path, nbytes: int, what: str) -> None:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise OSError(
            errno.ENOSPC,
            f"NVMe tier: {what} needs {nbytes} bytes but {directory} has {free} free; "
            "free space there or lower NVMeConfig.capacity_bytes",
        )


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


def _claim_path(config: NVMeConfig) -> Path:
    """The rank's file name, or the first ``-<n>`` variant no open tier of this process holds."""
    first = config.path()
    with _IN_USE_LOCK:
        path, n = first, 0
        while path.resolve() in _IN_USE:
            n += 1
            path = first.with_name(f"{first.stem}-{n}{first.suffix}")
        _IN_USE.add(path.resolve())
    return path


def release_swap_file(swap: SwapFile) -> None:
    """Let a later tier of this process reuse ``swap``'s file name (call after closing it)."""
    with _IN_USE_LOCK:
        _IN_USE.discard(swap.path.resolve())


def open_swap_file(config: NVMeConfig) -> SwapFile:
    """Open, preallocate and probe the rank's swap file."""
    directory = Path(config.directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = _claim_path(config)
    try:
        return _open(config, directory, path)
    except BaseException:
        with _IN_USE_LOCK:
            _IN_USE.discard(path.resolve())
        raise


def _open(config: NVMeConfig, directory: Path, path: Path) -> SwapFile:
    base = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    direct = config.direct != "off" and hasattr(os, "O_DIRECT")
    fd = -1
    if direct:
        try:
            fd = os.open(path, base | os.O_DIRECT, 0o600)
            _probe_direct(fd)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            if fd >= 0:
                os.close(fd)
            fd = -1
            _no_direct(config, path, err)
            direct = False
    if fd < 0:
        fd = os.open(path, base, 0o600)
    try:
        os.ftruncate(fd, 0)
        _check_free_space(directory, config.capacity_bytes, "preallocating the swap file")
        if config.capacity_bytes:
            os.posix_fallocate(fd, 0, config.capacity_bytes)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return SwapFile(path=path, fd=fd, direct=direct, size=config.capacity_bytes)


def grow_swap_file(swap: SwapFile, nbytes: int) -> None:
    """Preallocate ``nbytes`` more at the end of the file (clear ENOSPC if the disk is full)."""
    _check_free_space(swap.path.parent, nbytes, f"growing {swap.path} past {swap.size} bytes")
    os.posix_fallocate(swap.fd, swap.size, nbytes)
    swap.size += nbytes
