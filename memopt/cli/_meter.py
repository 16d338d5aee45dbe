"""Memory per tier for the recipe's log line, read at the moment of the line (no thread).

- ``rss``: the process's resident set (``VmRSS``), all host memory this rank holds;
- ``cuda``: ``torch.cuda.memory_allocated`` on a CUDA run (``-`` on CPU: device bytes are in
  ``rss`` there);
- ``pinned``: bytes reserved by memopt's shared pinned arena (``default_arena``: the CPU
  offload tier and its staging buffers live there);
- ``nvme``: bytes allocated on disk (``st_blocks``) by the files under the NVMe directories the
  config names (``sharding.nvme_path``, ``activations.nvme_path``); ``-`` when none is set.
"""

from __future__ import annotations

import os

import torch

from memopt.config import Config
from memopt.memory import fmt_bytes
from memopt.memory.timeline import proc_kib
from memopt.offload.arena import default_arena


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


class Meter:
    """Reads the four tiers for one ``line()``."""

    def __init__(self, config: Config) -> None:
        self.nvme_dirs = [d for d in (config.sharding.nvme_path, config.activations.nvme_path) if d]

    def tiers(self, device: torch.device) -> dict[str, int | None]:
        cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        nvme = sum(disk_bytes(d) for d in self.nvme_dirs) if self.nvme_dirs else None
        return {
            "rss": proc_kib("VmRSS") * 1024,
            "cuda": cuda,
            "pinned": default_arena().report().reserved_bytes,
            "nvme": nvme,
        }

    def line(self, setup: object) -> str:
        device = getattr(setup, "device", torch.device("cpu"))
        parts = [f"{k} {'-' if v is None else fmt_bytes(v)}" for k, v in self.tiers(device).items()]
        return " ".join(parts)
