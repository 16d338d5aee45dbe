"""Typed, eagerly validated configuration of the in-memory redundancy tier (REFT).

Two modes: ``replicate`` keeps ``copies`` whole copies of each rank's snapshot on the next
ranks of a ring (any ``copies`` lost ranks are survivable; ``copies`` blobs of host memory per
rank); ``erasure`` stripes the group's snapshots with k data + m parity blocks over exactly
k + m ranks (any m lost ranks are survivable; ``m / k`` of a blob per rank, plus the rank's
own blob unless ``own="reference"``). See ``memopt.checkpoint.redundancy`` for the protocol.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

from memopt.checkpoint import erasure as ec

__all__ = ["RedundancyConfig"]


@dataclass(frozen=True)
class RedundancyConfig:
    """How a rank's snapshot is protected: whole copies on peers, or k + m erasure coding.

    mode: "replicate" (``copies`` whole copies on the next ranks of a ring) or "erasure"
    (systematic Reed-Solomon, k data + m parity blocks, over a group of exactly k + m ranks).
    own: erasure only. "copy" keeps a packed copy of the rank's own snapshot (its data blocks
    feed other ranks' rebuilds); "reference" keeps the caller's tensors and repacks them when
    needed (no extra memory; the tensors must not change until the next ``protect``).
    """

    mode: Literal["replicate", "erasure"] = "replicate"
    copies: int = 1
    k: int = 0
    m: int = 0
    own: Literal["copy", "reference"] = "copy"

    def __post_init__(self) -> None:
        if self.mode not in ("replicate", "erasure"):
            raise ValueError(f"mode must be 'replicate' or 'erasure', got {self.mode!r}")
        if self.own not in ("copy", "reference"):
            raise ValueError(f"own must be 'copy' or 'reference', got {self.own!r}")
        for name in ("copies", "k", "m"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if self.mode == "replicate":
            if self.copies < 1:
                raise ValueError(f"replicate needs copies >= 1, got copies={self.copies}")
            if self.k or self.m:
                raise ValueError(
                    f"k={self.k}, m={self.m} apply only to mode='erasure'; "
                    "pass RedundancyConfig(mode='erasure', k=..., m=...)"
                )
        else:
            ec.check_code(self.k, self.m)
            if self.copies != 1:
                raise ValueError(f"copies={self.copies} applies only to mode='replicate'")

    def group_size_error(self, world: int) -> str | None:
        """Why this config cannot run on a group of ``world`` ranks (None if it can)."""
        if self.mode == "replicate" and self.copies > world - 1:
            return (
                f"copies={self.copies} needs at least {self.copies + 1} ranks, the group has "
                f"{world}; use copies <= {world - 1}"
            )
        if self.mode == "erasure" and self.k + self.m != world:
            return (
                f"erasure coding with k={self.k}, m={self.m} needs a group of k + m = "
                f"{self.k + self.m} ranks, this one has {world}; pick k + m = {world} or pass "
                "group=dist.new_group(...) of k + m ranks"
            )
        return None

    def fingerprint(self) -> int:
        return zlib.crc32(f"{self.mode}:{self.copies}:{self.k}:{self.m}".encode())
