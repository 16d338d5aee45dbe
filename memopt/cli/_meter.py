"""Memory per tier for the recipe's log line, read at the moment of the line (no thread).

- ``rss``: the process's resident set (``VmRSS``), all host memory this rank holds;
- ``cuda``: ``torch.cuda.memory_allocated`` on a CUDA run (``-`` on CPU: device bytes are in
  ``rss`` there);
- ``pinned``: bytes reserved by memopt's shared pinned arena (``default_arena``: the CPU
  offload tier and its staging buffers live there), and in brackets the host memory the
  arena holds for them (``capacity_bytes``: whole chunks, 256 MiB by default, page-locked
  where pinning is on; this is what ``rss`` and ``VmLck`` see, not the reserved bytes);
- ``nvme``: bytes held in the NVMe tiers reachable from the optimizer (``requested_bytes`` of
  each ``NVMeTier`` found by a short walk over the optimizer's attributes), and in brackets the
  bytes allocated on disk (``st_blocks``) by the files under the NVMe directories the config
  names (``sharding.nvme_path``, ``activations.nvme_path``: swap files are preallocated, so
  this is at least the former); ``-`` when no NVMe directory is set. All figures are this
  rank's (the log line is rank 0's).
"""

from __future__ import annotations

import os

import torch

from memopt.config import Config
from memopt.memory import fmt_bytes
from memopt.memory.timeline import proc_kib
from memopt.offload.arena import default_arena
from memopt.offload.nvme_tier import NVMeTier


def disk_bytes(directory: str) -> int:
    """Bytes allocated on disk by the regular files under ``directory`` (0 if missing)."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # a file removed while we walk
                continue
    return total


def find_tiers(root: object, depth: int = 4) -> list[NVMeTier]:
    """``NVMeTier`` objects reachable from ``root`` through attributes, lists and dicts."""
    found: dict[int, NVMeTier] = {}
    seen: set[int] = set()
    frontier = [root]
    for _ in range(depth):
        nxt: list[object] = []
        for obj in frontier:
            if id(obj) in seen or isinstance(obj, (torch.Tensor, str, bytes, int, float)):
                continue
            seen.add(id(obj))
            if isinstance(obj, NVMeTier):
                found[id(obj)] = obj
                continue
            if isinstance(obj, dict):
                nxt.extend(obj.values())
            elif isinstance(obj, (list, tuple)):
                nxt.extend(obj)
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                nxt.extend(vars(obj).values())
        frontier = nxt
    return list(found.values())


class Meter:
    """Reads the four tiers for one ``line()``."""

    def __init__(self, config: Config) -> None:
        self.nvme_dirs = [d for d in (config.sharding.nvme_path, config.activations.nvme_path) if d]

        self._tiers: list[NVMeTier] | None = None

    def tiers(self, device: torch.device, optimizer: object = None) -> dict[str, int | None]:
        """Bytes per tier now (``None``: the tier is not in use)."""
        if self._tiers is None:
            self._tiers = find_tiers(optimizer) if self.nvme_dirs else []
        cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        arena = default_arena().report()
        held = sum(t.report().requested_bytes for t in self._tiers) if self.nvme_dirs else None
        return {
            "rss": proc_kib("VmRSS") * 1024,
            "cuda": cuda,
            "pinned": arena.reserved_bytes,
            "pinned_held": arena.capacity_bytes,
            "nvme": held,
            "nvme_disk": sum(disk_bytes(d) for d in self.nvme_dirs) if self.nvme_dirs else None,
        }

    def line(self, setup: object) -> str:
        device = getattr(setup, "device", torch.device("cpu"))
        t = self.tiers(device, getattr(setup, "optimizer", None))
        nvme = "-" if t["nvme"] is None else fmt_bytes(t["nvme"])
        if t["nvme_disk"] is not None:
            nvme += f" (file {fmt_bytes(t['nvme_disk'])})"
        cuda = "-" if t["cuda"] is None else fmt_bytes(t["cuda"])
        return (f"rss {fmt_bytes(t['rss'] or 0)} cuda {cuda} "
                f"pinned {fmt_bytes(t['pinned'] or 0)} (held {fmt_bytes(t['pinned_held'] or 0)}) "
                f"nvme {nvme}")
