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


def _cuda_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister; returns the CUDA error code (0 = success)."""
    cudart = torch.cuda.cudart()
    return int(cudart.cudaHostRegister(ptr, nbytes, 0))


class HostBuffer:
    """One page-aligned mapping of ``nbytes`` (a page multiple), pinned if it could be."""

    def __init__(
        self,
        nbytes: int,
        pin: PinMode = "auto",
        prepare: Callable[[int, int], None] | None = None,
    ) -> None:
        if nbytes <= 0 or nbytes % PAGE_SIZE:
            raise ValueError(f"HostBuffer: nbytes {nbytes} must be a positive page multiple")
        self.nbytes = nbytes
        self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.ptr = self.tensor.data_ptr()
        self.pinned: Literal["cuda", "mlock", "none"] = "none"
        if prepare is not None:
            prepare(self.ptr, nbytes)
        if pin != "off":
            self._pin(pin)

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
