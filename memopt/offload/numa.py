"""NUMA nodes and per-range page placement through raw syscalls (no libnuma needed).

- Nodes come from ``/sys/devices/system/node``: each online node's CPUs (``cpulist``) and
  memory (``meminfo``). A node with memory and no CPUs is what a CXL memory expander (or a
  memory-only ``-numa node`` in a VM) looks like.
- ``mbind(addr, len, mode, nodemask, maxnode, flags)`` (through ``libc.syscall``) sets the
  policy of a page-aligned range: ``bind`` (only these nodes), ``preferred``, ``interleave``
  (round robin by page) or ``weighted_interleave`` (Linux >= 6.9: round robin with the
  per-node weights in ``/sys/kernel/mm/mempolicy/weighted_interleave/nodeN``). Called on a
  fresh mapping before first touch, the pages are born on the chosen nodes; with
  ``MPOL_MF_MOVE`` pages already present are migrated.
- Placement is checked with ``move_pages(pid=0, pages, nodes=NULL)``, which reports the node of
  each resident page, or by reading the range's line of ``/proc/self/numa_maps``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memopt.offload.hostmem import _LIBC, PAGE_SIZE

__all__ = [
    "NumaNode",
    "Placement",
    "apply_placement",
    "check_nodes",
    "numa_maps_entry",
    "numa_nodes",
    "page_nodes",
    "weighted_interleave_supported",
]

NODE_ROOT = Path("/sys/devices/system/node")
WEIGHTS_ROOT = Path("/sys/kernel/mm/mempolicy/weighted_interleave")
PlacementMode = Literal["bind", "preferred", "interleave", "weighted_interleave"]
_MODES = {"preferred": 1, "bind": 2, "interleave": 3, "weighted_interleave": 6}
MPOL_MF_STRICT, MPOL_MF_MOVE = 1, 2
# (mbind, move_pages) syscall numbers per architecture.
_SYSCALLS = {"x86_64": (237, 279), "aarch64": (235, 239), "ppc64le": (259, 301)}
_MASK_WORDS = 16  # nodemask of 1024 bits

_LIBC.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int

    @property
    def cpu_less(self) -> bool:
        """Memory without CPUs: a CXL expander or a far memory node."""
        return not self.cpus and self.mem_total_bytes > 0


def _parse_list(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def numa_nodes(root: Path = NODE_ROOT) -> list[NumaNode]:
    """The online NUMA nodes (one node 0 with every CPU when the kernel shows none)."""
    online = root / "online"
    if not online.exists():
        return [NumaNode(0, tuple(sorted(os.sched_getaffinity(0))), 0)]
    nodes = []
    for nid in _parse_list(online.read_text()):
        d = root / f"node{nid}"
        cpus = _parse_list((d / "cpulist").read_text()) if (d / "cpulist").exists() else ()
        mem = 0
        meminfo = d / "meminfo"
        if meminfo.exists():
            m = re.search(r"MemTotal:\s+(\d+)\s*kB", meminfo.read_text())
            mem = int(m.group(1)) * 1024 if m else 0
        nodes.append(NumaNode(nid, cpus, mem))
    return nodes


def check_nodes(nodes: tuple[int, ...] | list[int]) -> None:
    """ValueError naming the nodes that exist when one asked for does not."""
    have = [n.id for n in numa_nodes()]
    missing = [n for n in nodes if n not in have]
    if not nodes or missing:
        raise ValueError(
            f"NUMA node(s) {missing or list(nodes)} do not exist on this machine; "
            f"the online nodes are {have} (from {NODE_ROOT}/online)"
        )


def weighted_interleave_supported() -> bool:
    """MPOL_WEIGHTED_INTERLEAVE exists (Linux >= 6.9 exposes its weights in sysfs)."""
    return WEIGHTS_ROOT.is_dir()


@dataclass(frozen=True)
class Placement:
    """A memory policy for a range: ``mode`` over ``nodes``."""

    mode: PlacementMode
    nodes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"Placement.mode must be one of {sorted(_MODES)}, not {self.mode!r}")
        if self.mode == "weighted_interleave" and not weighted_interleave_supported():
            raise NotImplementedError(
                f"weighted interleave needs Linux >= 6.9 ({WEIGHTS_ROOT} is missing; kernel "
                f"{platform.release()}); use mode='interleave'"
            )
        check_nodes(self.nodes)


def _syscall_numbers() -> tuple[int, int]:
    try:
        return _SYSCALLS[platform.machine()]
    except KeyError:
        raise NotImplementedError(
            f"NUMA placement: no syscall numbers for {platform.machine()!r} "
            f"(known: {sorted(_SYSCALLS)})"
        ) from None


def apply_placement(ptr: int, nbytes: int, placement: Placement, move: bool = False) -> None:
    """``mbind`` the page-aligned range ``[ptr, ptr + nbytes)`` to ``placement``."""
    if ptr % PAGE_SIZE or nbytes % PAGE_SIZE:
        raise ValueError(f"mbind needs a page-aligned range, got {ptr:#x}+{nbytes}")
    mask = (ctypes.c_ulong * _MASK_WORDS)()
    for node in placement.nodes:
        mask[node // 64] |= 1 << (node % 64)
    flags = (MPOL_MF_MOVE | MPOL_MF_STRICT) if move else 0
    nr_mbind, _ = _syscall_numbers()
    res = _LIBC.syscall(
        ctypes.c_long(nr_mbind), ctypes.c_void_p(ptr), ctypes.c_ulong(nbytes),
        ctypes.c_int(_MODES[placement.mode]), mask, ctypes.c_ulong(_MASK_WORDS * 64 + 1),
        ctypes.c_uint(flags),
    )  # fmt: skip
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(
            err,
            f"mbind({placement.mode} on nodes {list(placement.nodes)}) of {nbytes} bytes "
            f"at {ptr:#x} failed: [{errno.errorcode.get(err, err)}] {os.strerror(err)}",
        )


def page_nodes(ptr: int, nbytes: int) -> list[int]:
    """Node of each page in the range (negative: -errno, e.g. -ENOENT for a page not present)."""
    first = ptr - ptr % PAGE_SIZE
    count = (ptr + nbytes - first + PAGE_SIZE - 1) // PAGE_SIZE
    pages = (ctypes.c_void_p * count)(*[first + i * PAGE_SIZE for i in range(count)])
    status = (ctypes.c_int * count)()
    _, nr_move_pages = _syscall_numbers()
    res = _LIBC.syscall(
        ctypes.c_long(nr_move_pages), ctypes.c_int(0), ctypes.c_ulong(count), pages, None,
        status, ctypes.c_int(0),
    )  # fmt: skip
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages query failed: {os.strerror(err)}")
    return list(status)


def numa_maps_entry(ptr: int) -> dict[str, str]:
    """The ``/proc/self/numa_maps`` fields of the mapping holding ``ptr``.

    Returns e.g. ``{"policy": "bind:0", "anon": "256", "N0": "256", ...}``; the mapping is
    found through ``/proc/self/maps`` (numa_maps lines only give a start address).
    """
    start = None
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= ptr < hi:
            start = lo
            break
    if start is None:
        raise ValueError(f"address {ptr:#x} is not mapped in this process")
    for line in Path("/proc/self/numa_maps").read_text().splitlines():
        fields = line.split()
        if int(fields[0], 16) == start:
            n_policy = 3 if fields[1] == "weighted" else 2  # "weighted interleave:0-1"
            out = {"policy": " ".join(fields[1:n_policy])}
            out.update(f.partition("=")[::2] for f in fields[n_policy:] if "=" in f)
            return out
    raise ValueError(f"no /proc/self/numa_maps line for the mapping at {start:#x}")
