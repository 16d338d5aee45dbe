"""The NUMA / CXL tier and the placement policy that picks a node per tensor role.

``NumaTier(placement)`` is the pinned CPU tier over its own arena whose chunks are ``mbind``-ed
to ``placement`` right after they are mapped and before any page is touched, so every tensor
allocated on it lives on the chosen node(s) (local DRAM, a CXL expander, or interleaved). The
arena is not pinned by default (``mlock`` is optional: CXL memory is ordinary host memory to
the kernel, and DMA staging goes through the main pinned arena).

``PlacementPolicy`` encodes the CXL paper's finding (arXiv 2507.03305): tensors the CPU touches
element by element (optimizer state, fp32 master weights, gradients being accumulated) are
**latency-critical** and stay in local DRAM; tensors that are only streamed (parameter shards
staged for the device, swapped activations, checkpoint staging) go to the far, CPU-less node,
interleaved (weighted by the kernel's per-node weights where supported) across all far nodes
so several expanders share the traffic. ``PlacementPolicy.from_system()`` reads the nodes; on a
machine with no CPU-less node everything stays local.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.numa import (
    Placement,
    PlacementMode,
    apply_placement,
    check_nodes,
    numa_nodes,
    weighted_interleave_supported,
)
from memopt.offload.pinned_tier import PinnedCPUTier

__all__ = ["LATENCY_CRITICAL_ROLES", "NumaTier", "PlacementPolicy"]

LATENCY_CRITICAL_ROLES = frozenset({"optimizer_state", "master_params", "gradients"})
STREAMING_ROLES = frozenset({"params", "activations", "checkpoint", "io_buffer"})


class NumaTier(PinnedCPUTier):
    """Host tier whose memory is placed on NUMA node(s) by ``mbind``."""

    name = "numa"

    def __init__(self, placement: Placement | int, config: ArenaConfig | None = None) -> None:
        if isinstance(placement, int) and not isinstance(placement, bool):
            placement = Placement("bind", (placement,))
        elif not isinstance(placement, Placement):
            raise TypeError(
                f"NumaTier: placement must be a NUMA node id (int) or a Placement, got "
                f"{placement!r} ({type(placement).__name__})"
            )
        self.placement = placement
        cfg = config or ArenaConfig(pin="off", chunk_bytes=64 << 20)
        arena = PinnedArena(cfg, prepare=lambda ptr, n: apply_placement(ptr, n, placement))
        super().__init__(arena)

    def close(self) -> None:
        super().close()
        self.arena.close()


def _local_node() -> int:
    """The node holding the CPUs this process may run on (the first such node)."""
    mine = os.sched_getaffinity(0)
    for node in numa_nodes():
        if mine & set(node.cpus):
            return node.id
    return numa_nodes()[0].id


@dataclass(frozen=True)
class PlacementPolicy:
    """Role -> placement: latency-critical roles local, streamed roles on the far nodes."""

    local_node: int
    far_nodes: tuple[int, ...]
    far_mode: PlacementMode = "interleave"
    latency_critical: frozenset[str] = field(default=LATENCY_CRITICAL_ROLES)

    def __post_init__(self) -> None:
        check_nodes((self.local_node, *self.far_nodes))
        if self.far_mode not in ("bind", "interleave", "weighted_interleave"):
            raise ValueError(
                f"far_mode must be bind/interleave/weighted_interleave, not {self.far_mode!r}"
            )

    @classmethod
    def from_system(cls) -> PlacementPolicy:
        """Local node of this process; far = the CPU-less memory nodes (or local if none)."""
        local = _local_node()
        far = tuple(n.id for n in numa_nodes() if n.cpu_less) or (local,)
        mode: PlacementMode = (
            "weighted_interleave" if weighted_interleave_supported() else "interleave"
        )
        return cls(local_node=local, far_nodes=far, far_mode=mode)

    def placement(self, role: str) -> Placement:
        """Where a tensor of ``role`` goes (unknown roles count as streamed)."""
        if role in self.latency_critical:
            return Placement("bind", (self.local_node,))
        mode = self.far_mode if len(self.far_nodes) > 1 else "bind"
        return Placement(mode, self.far_nodes)
