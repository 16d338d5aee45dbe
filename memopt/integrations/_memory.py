"""Memory per tier, sampled once: host RSS, device allocated, pinned arena bytes.

Used by the HF callback's ``on_log`` and by training loops under accelerate. Sources:
``/proc/self/status`` ``VmRSS``/``VmHWM`` (0 where there is no /proc),
``torch.cuda.memory_allocated``/``max_memory_allocated`` when CUDA is initialised, and the
host bytes held (``capacity_bytes``) and the page-locked share (``pinned_bytes``) of every
``PinnedArena`` handed in plus the process-wide default arena when one was created (the one
memopt's offload tiers share). Page-locked means ``cudaHostRegister`` with CUDA and ``mlock``
on a CPU-only build (memopt.offload.hostmem), so the share is not 0 there: a chunk counts
whenever locking succeeded (chunks left unlocked, past ``RLIMIT_MEMLOCK`` or with pinning
off, are not counted).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from memopt.memory.timeline import proc_kib
from memopt.offload import arena as _arena

MIB = 1024 * 1024


def memory_by_tier(arenas: Iterable[Any] = ()) -> dict[str, float]:
    """Keys ``mem/host_rss_mib``, ``mem/host_peak_mib``, ``mem/arena_mib``, ``mem/pinned_mib``
    and, with CUDA in use, ``mem/cuda_alloc_mib``, ``mem/cuda_peak_mib``; MiB rounded to 0.1."""
    out = {
        "mem/host_rss_mib": proc_kib("VmRSS") / 1024,
        "mem/host_peak_mib": proc_kib("VmHWM") / 1024,
    }
    pools = [a for a in arenas if a is not None]
    default = getattr(_arena, "_DEFAULT", None)  # created lazily; never create it here
    if default is not None and all(a is not default for a in pools):
        pools.append(default)
    reports = [a.report() for a in pools]
    out["mem/arena_mib"] = sum(int(r.capacity_bytes) for r in reports) / MIB
    out["mem/pinned_mib"] = sum(int(r.pinned_bytes) for r in reports) / MIB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["mem/cuda_alloc_mib"] = torch.cuda.memory_allocated() / MIB
        out["mem/cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
    return {k: round(v, 1) for k, v in out.items()}


def format_memory(mem: dict[str, float]) -> str:
    """One line: ``host 812.3 MiB (peak 900.1) | arena 64.0 MiB (pinned 64.0) | cuda ...``."""
    parts = [f"host {mem['mem/host_rss_mib']} MiB (peak {mem['mem/host_peak_mib']})"]
    parts.append(f"arena {mem['mem/arena_mib']} MiB (pinned {mem['mem/pinned_mib']})")
    if "mem/cuda_alloc_mib" in mem:
        parts.append(f"cuda {mem['mem/cuda_alloc_mib']} MiB (peak {mem['mem/cuda_peak_mib']})")
    return " | ".join(parts)


__all__ = ["format_memory", "memory_by_tier"]
