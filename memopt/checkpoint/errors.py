"""Errors of ``memopt.checkpoint``: each names the snapshot, the file and the fix."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A save failed in the background (raised from ``wait()``/``close()``/the next ``save``)."""


class CorruptSnapshotError(ValueError):
    """A snapshot's files are missing, truncated or fail their checksum."""


class SnapshotMismatchError(ValueError):
    """A snapshot does not fit the model/optimizer it is loaded into (names or shapes)."""


class PeerRecoveryError(CheckpointError):
    """Peers cannot rebuild the in-memory snapshot (too many ranks lost, steps differ, none)."""
