"""Page-aligned host buffers, pinned when possible: the memory under the arena's chunks.

A buffer is an anonymous ``mmap`` (page-aligned, zero-filled, committed lazily), seen by torch
as a ``uint8`` tensor through ``torch.frombuffer`` (no copy). Pinning, in order:

- with CUDA available: ``cudaHostRegister`` on the mapping (exact size: no power-of-two
  rounding, unlike torch's caching host allocator that backs ``pin_memory()``);
- on a CPU-only build: ``mlock`` through ctypes, which stands in for pinning (the pages stay
  resident, so O_DIRECT and DMA-style copies never fault). The kernel refuses past
  ``RLIMIT_MEMLOCK`` (often 8 MiB) unless the process has CAP_IPC_LOCK;
- when pinning fails and ``pin="auto"``, one warning per process names the limit and the fix,
  and the buffer stays unlocked: never a crash. ``pin="required"`` raises instead.

Before pinning (which faults the pages in), an optional ``prepare(ptr, nbytes)`` hook runs: the
NUMA tier uses it to ``mbind`` the range to a node, so first touch lands there.

Transparent huge pages (``huge_pages="auto" | "required"``, default ``"off"``): the mapping is
over-mapped by two huge pages (2 MiB on x86-64) and the buffer is a view that starts on a huge
page boundary, with at least one untouched 4 KiB page of slack on both sides (so the kernel
keeps the buffer's range in a VMA of its own). ``madvise(MADV_HUGEPAGE)`` is applied before the
first touch; once pinning faulted the pages in (``mlock``/``cudaHostRegister``; unpinned,
``"required"`` faults them with ``MADV_POPULATE_WRITE``, ``"auto"`` leaves them lazy) the result
is verified from ``AnonHugePages`` of that VMA in ``/proc/self/smaps``: ``huge_bytes`` is what
huge pages really back. Why: a 1 MiB O_DIRECT
request made of scattered 4 KiB pages needs 256 DMA segments, more than many queues take
(virtio: 254), so the block layer splits it in two; inside one 2 MiB page it is one segment.
When THP is ``never`` (``/sys/kernel/mm/transparent_hugepage/enabled``) or the kernel backs
less than the buffer's whole huge pages, ``"auto"`` keeps the 4 KiB pages (one warning per
process) and ``"required"`` raises naming the sysfs setting. ``nbytes`` stays exact: only its
whole 2 MiB pages can be huge (the arena rounds chunks up to 2 MiB when it asks for them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import resource
from collections.abc import Callable
from typing import Literal

import torch

from memopt._utils import warn_once

PAGE_SIZE = mmap.PAGESIZE
PinMode = Literal["auto", "required", "off"]
HugePageMode = Literal["auto", "required", "off"]
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_THP_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python 3.11's mmap module does not name it

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_LIBC.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _mlock(ptr: int, nbytes: int) -> int:
    """0 on success, else the errno (tests replace this to simulate a low memlock limit)."""
    if _LIBC.mlock(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes)) == 0:
        return 0
    return ctypes.get_errno()


def _munlock(ptr: int, nbytes: int) -> None:
    _LIBC.munlock(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes))


def memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK in bytes (``resource.RLIM_INFINITY`` when unlimited)."""
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]


def _read_sysfs(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def thp_mode() -> str:
    """The bracketed THP mode ("always", "madvise", "never"), or "unavailable"."""
    text = _read_sysfs(THP_ENABLED)
    if text is None or "[" not in text:
        return "unavailable"
    return text.split("[", 1)[1].split("]", 1)[0]


def huge_page_size() -> int:
    """The PMD huge page size (2 MiB on x86-64), from sysfs when it says."""
    text = _read_sysfs(_THP_SIZE)
    return int(text) if text and text.isdigit() else 2 << 20


def _madvise_huge(mapping: mmap.mmap, offset: int, nbytes: int) -> int:
    """0 on success, else the errno (tests replace this to simulate a refusing kernel)."""
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    except OSError as err:
        return err.errno or errno.EINVAL
    return 0


def anon_huge_bytes(ptr: int, nbytes: int) -> int:
    """AnonHugePages of the VMAs of ``/proc/self/smaps`` that overlap [ptr, ptr+nbytes),
    capped at ``nbytes`` (exact when the range is a VMA of its own, as HostBuffer makes it)."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo < ptr + nbytes and hi > ptr
                elif inside and head == "AnonHugePages:":
                    total += int(line.split()[1]) << 10
    except OSError:
        return 0
    return min(total, nbytes)


class HostMapError(OSError):
    """The anonymous ``mmap`` under a host buffer failed (errno kept: ENOMEM, usually)."""


def _map_anonymous(nbytes: int) -> mmap.mmap:
    """A fresh private anonymous mapping; ``HostMapError`` naming the size and the limits
    that usually refuse it (RLIMIT_AS, strict overcommit)."""
    try:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as err:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
        overcommit = _read_sysfs("/proc/sys/vm/overcommit_memory") or "unknown"
        raise HostMapError(
            err.errno,
            f"mmap of {nbytes} bytes of anonymous memory failed "
            f"({errno.errorcode.get(err.errno or 0, '?')}: {err.strerror}; address-space limit "
            f"RLIMIT_AS (`ulimit -v`) {shown}, vm.overcommit_memory {overcommit})",
        ) from err


def _cuda_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister; returns the CUDA error code (0 = success)."""
    cudart = torch.cuda.cudart()
    return int(cudart.cudaHostRegister(ptr, nbytes, 0))


class HostBuffer:
    """One page-aligned mapping of ``nbytes`` (a page multiple), pinned if it could be, on
    huge pages when asked and the kernel allows (``huge_bytes``: bytes verified huge)."""

    def __init__(
        self,
        nbytes: int,
        pin: PinMode = "auto",
        prepare: Callable[[int, int], None] | None = None,
        huge_pages: HugePageMode = "off",
    ) -> None:
        if nbytes <= 0 or nbytes % PAGE_SIZE:
            raise ValueError(f"HostBuffer: nbytes {nbytes} must be a positive page multiple")
        if huge_pages not in ("auto", "required", "off"):
            raise ValueError(
                f"HostBuffer: huge_pages must be 'auto', 'required' or 'off', not {huge_pages!r}"
            )
        self.nbytes = nbytes
        self.huge_bytes = 0
        self.pinned: Literal["cuda", "mlock", "none"] = "none"
        offset, advised = 0, False
        if huge_pages == "off":
            self._map = _map_anonymous(nbytes)
        else:
            offset, advised = self._map_huge(nbytes, huge_pages)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=offset)
        self.ptr = self.tensor.data_ptr()
        if prepare is not None:
            prepare(self.ptr, nbytes)
        if pin != "off":
            self._pin(pin)
        if advised:
            self._check_huge(offset, huge_pages)

    def _map_huge(self, nbytes: int, mode: HugePageMode) -> tuple[int, bool]:
        """Over-map, pick the huge-aligned offset, madvise; (offset, advised)."""
        huge = huge_page_size()
        self._map = _map_anonymous(nbytes + 2 * huge)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        offset = huge - base % huge  # in (0, huge]: slack before and after the buffer
        thp = thp_mode()
        if thp not in ("always", "madvise"):
            self._huge_failed(mode, f"transparent huge pages are {thp!r} ({THP_ENABLED})")
            return offset, False
        err = _madvise_huge(self._map, offset, nbytes)
        if err:
            self._huge_failed(
                mode, f"madvise(MADV_HUGEPAGE) failed ({errno.errorcode.get(err, err)}); "
                f"THP mode is {thp!r} ({THP_ENABLED})"
            )  # fmt: skip
            return offset, False
        return offset, True

    def _check_huge(self, offset: int, mode: HugePageMode) -> None:
        """Read back what huge pages back once the pages are in: pinning faulted them; else
        "required" faults them now, "auto" leaves them lazy (huge from their first touch,
        unverified: ``huge_bytes`` counts only what is resident now)."""
        if self.pinned == "none" and mode == "auto":
            self.huge_bytes = anon_huge_bytes(self.ptr, self.nbytes)
            return
        if self.pinned == "none":
            try:
                self._map.madvise(_MADV_POPULATE_WRITE, offset, self.nbytes)
            except OSError:
                self.tensor.zero_()  # older kernels: touch every page
        huge = huge_page_size()
        want = self.nbytes // huge * huge
        self.huge_bytes = anon_huge_bytes(self.ptr, self.nbytes)
        if self.huge_bytes < want:
            self._huge_failed(
                mode, f"the kernel backed {self.huge_bytes} of {want} bytes with huge pages "
                f"(THP mode {thp_mode()!r} in {THP_ENABLED}; defrag setting or fragmentation)"
            )  # fmt: skip

    @staticmethod
    def _huge_failed(mode: HugePageMode, why: str) -> None:
        if mode == "required":
            raise OSError(
                errno.ENOMEM,
                f"memopt huge-page host memory: {why}. Enable THP "
                f"(`echo madvise > {THP_ENABLED}`) or pass huge_pages='auto' or 'off'",
            )
        warn_once(
            f"memopt huge-page host memory: {why}. Using 4 KiB pages (correct; 1 MiB O_DIRECT "
            "requests may be split by the block layer)",
            RuntimeWarning,
        )

    def _pin(self, pin: PinMode) -> None:
        if torch.cuda.is_available():
            code = _cuda_register(self.ptr, self.nbytes)
            if code == 0:
                self.pinned = "cuda"
                return
            self._pin_failed(pin, f"cudaHostRegister returned CUDA error {code}")
            return
        err = _mlock(self.ptr, self.nbytes)
        if err == 0:
            self.pinned = "mlock"
            return
        limit = memlock_limit()
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
        self._pin_failed(
            pin,
            f"mlock failed ({errno.errorcode.get(err, err)}: "
            f"{os.strerror(err)}); RLIMIT_MEMLOCK is {shown}. Raise it (`ulimit -l unlimited`, "
            "LimitMEMLOCK= in systemd, --ulimit memlock=-1 in docker) or pass pin='off'",
        )

    @staticmethod
    def _pin_failed(pin: PinMode, why: str) -> None:
        if pin == "required":
            raise OSError(errno.ENOMEM, f"memopt pinned host memory: {why}")
        warn_once(
            f"memopt pinned host memory: {why}. Falling back to unlocked page-aligned memory "
            "(correct, but host<->device copies and O_DIRECT may be slower)",
            RuntimeWarning,
        )

    def release(self) -> None:
        """Unpin. The mapping itself goes when the last tensor viewing it is gone."""
        if self.pinned == "mlock":
            _munlock(self.ptr, self.nbytes)
        elif self.pinned == "cuda":
            torch.cuda.cudart().cudaHostUnregister(self.ptr)
        self.pinned = "none"
