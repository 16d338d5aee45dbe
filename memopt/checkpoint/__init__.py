"""Asynchronous checkpoint snapshots: lazy multi-level, crash-consistent, reshardable.

``AsyncCheckpointer(directory, keep=3)``: ``save`` captures references and returns; the copy
to host staging overlaps the next forward/backward and is fenced before the next optimizer
step; a background writer publishes each snapshot atomically (safetensors per rank with
aligned tensors, a JSON manifest with checksums). ``load`` verifies and reshards to the
current world size/layout. ``export_hf`` writes consolidated weights for Hugging Face.
``redundancy=RedundancyConfig(...)`` also keeps each save in peers' host memory (REFT), from
which ``recover()`` rebuilds a lost rank's snapshot without the disk.
See docs/checkpoint.md.
"""

from __future__ import annotations

from memopt.checkpoint.checkpointer import AsyncCheckpointer
from memopt.checkpoint.commit import FORMAT_VERSION
from memopt.checkpoint.config import CheckpointConfig
from memopt.checkpoint.errors import (
    CheckpointError,
    CorruptSnapshotError,
    PeerRecoveryError,
    SnapshotMismatchError,
)
from memopt.checkpoint.export import export_hf
from memopt.checkpoint.reader import Snapshot
from memopt.checkpoint.redundancy_config import RedundancyConfig
from memopt.checkpoint.stats import CheckpointStats, SaveRecord

__all__ = [
    "FORMAT_VERSION",
    "AsyncCheckpointer",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointStats",
    "CorruptSnapshotError",
    "PeerRecoveryError",
    "RedundancyConfig",
    "SaveRecord",
    "Snapshot",
    "SnapshotMismatchError",
    "export_hf",
]
