"""A rank's staged snapshot as one host byte blob (the unit of the in-memory tier), and a
``Snapshot`` assembled from such blobs instead of files.

Layout of a mirror blob (1-D uint8): the 8-byte magic ``MOPTMIRR``, a u64 little-endian
header length N, N bytes of UTF-8 JSON ``{"step", "rank", "world_size", "file_bytes",
"skeleton"}`` space-padded so that ``16 + N`` is a multiple of 4096, then the rank's
safetensors file image byte for byte as the writer puts it on disk (the file plan's header,
then the staged data section). The image therefore starts 4096-aligned and every tensor in it
is at its natural alignment: ``parse_mirror`` returns views, no copy. The skeleton is the
rank's JSON file (non-tensor optimizer state, scheduler, extras, RNG, the tensor table), so a
blob is a complete snapshot of the rank: step, tensors and metadata. No pickle.

``MemorySnapshot(blobs)`` is a ``reader.Snapshot`` over one blob per rank (rank order), so
``restore.*`` loads it exactly as it loads the files of a published snapshot.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from memopt.checkpoint.errors import CorruptSnapshotError
from memopt.checkpoint.fileformat import parse
from memopt.checkpoint.reader import Snapshot

MAGIC = b"MOPTMIRR"
ALIGN = 4096
# Tensors that restore hands back to the caller without copying (scheduler state, extras):
# cloned so that they never alias a blob whose memory is reused later.
_RETURNED = ("extra.", "scheduler.")


def mirror_prefix(
    step: int, rank: int, world: int, skeleton: dict[str, Any], file_header: bytes, data: int
) -> bytes:
    """Everything of the blob before the staged data section (header + the file's header)."""
    meta = {
        "step": step,
        "rank": rank,
        "world_size": world,
        "file_bytes": len(file_header) + data,
        "skeleton": skeleton,
    }
    raw = json.dumps(meta, separators=(",", ":"), allow_nan=True).encode()
    n = -(-(16 + len(raw)) // ALIGN) * ALIGN - 16
    return MAGIC + struct.pack("<Q", n) + raw + b" " * (n - len(raw)) + file_header


def parse_mirror(blob: torch.Tensor, label: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of a mirror blob; the tensors are views into ``blob``."""
    raw = bytes(blob[:16].numpy()) if blob.numel() >= 16 else b""
    if raw[:8] != MAGIC:
        raise CorruptSnapshotError(f"{label}: not a memopt in-memory snapshot (bad magic)")
    (n,) = struct.unpack("<Q", raw[8:16])
    if 16 + n > blob.numel():
        raise CorruptSnapshotError(f"{label}: truncated (header of {n} bytes)")
    head: dict[str, Any] = json.loads(bytes(blob[16 : 16 + n].numpy()))
    start, size = 16 + n, int(head["file_bytes"])
    if start + size > blob.numel():
        raise CorruptSnapshotError(f"{label}: truncated file image ({size} bytes expected)")
    return head, parse(blob[start : start + size].numpy(), label)


class MemorySnapshot(Snapshot):
    """A snapshot assembled from every rank's mirror blob (index = rank), no files read."""

    def __init__(self, blobs: list[torch.Tensor], label: str) -> None:
        self.path = label
        self.world = len(blobs)
        self.skeletons = []
        self.tensors = []
        steps = set()
        for r, blob in enumerate(blobs):
            head, tensors = parse_mirror(blob, f"{label}, rank {r}")
            if head["rank"] != r or head["world_size"] != self.world:
                raise CorruptSnapshotError(
                    f"{label}: blob {r} is rank {head['rank']} of {head['world_size']}, "
                    f"expected rank {r} of {self.world}"
                )
            steps.add(int(head["step"]))
            for name in [n for n in tensors if n.startswith(_RETURNED)]:
                tensors[name] = tensors[name].clone()
            self.skeletons.append(head["skeleton"])
            self.tensors.append(tensors)
        if len(steps) != 1:
            raise CorruptSnapshotError(f"{label}: ranks' blobs hold different steps {steps}")
        self.step = steps.pop()
        self.manifest = {"step": self.step, "world_size": self.world, "source": "peers"}
        self._index()
