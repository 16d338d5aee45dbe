"""Layer 2: storage tiers for what memopt keeps off the accelerator, and the CPU optimizer step.

Submodules are imported by name (``memopt.offload.cpu_adam``: the fused CPU AdamW kernel with
its native/torch dispatch).

Storage tiers (one ``StorageTier`` interface, see ``tier``): ``PinnedCPUTier`` over the shared
``PinnedArena``, ``NumaTier`` (CXL / NUMA placement by ``mbind``) with ``PlacementPolicy``,
and ``NVMeTier`` (one O_DIRECT file per rank, async I/O backend). Guide: docs/offload.md.

Optimizer state on a tier: ``OffloadedAdamW`` (``OffloadConfig``) keeps fp32 master weights
and AdamW moments on a tier and steps them through the double-buffered pipeline of
``pipeline`` (``memopt.shard(..., offload=...)`` wires it under ZeRO 1/2).
"""

from memopt.offload.arena import ArenaConfig, PinnedArena, default_arena
from memopt.offload.numa import Placement, numa_nodes
from memopt.offload.numa_tier import NumaTier, PlacementPolicy
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.optimizer import OffloadConfig, OffloadedAdamW
from memopt.offload.pinned_tier import PinnedCPUTier
from memopt.offload.tier import IOFuture, StorageTier, TierHandle, TierReport

__all__ = [
    "ArenaConfig",
    "IOFuture",
    "NVMeConfig",
    "NVMeTier",
    "NumaTier",
    "OffloadConfig",
    "OffloadedAdamW",
    "PinnedArena",
    "PinnedCPUTier",
    "Placement",
    "PlacementPolicy",
    "StorageTier",
    "TierHandle",
    "TierReport",
    "default_arena",
    "numa_nodes",
]
