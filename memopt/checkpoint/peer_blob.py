"""One rank's snapshot as a single byte blob, for the in-memory redundancy tier (no pickle).

Layout: the 8-byte magic ``MOPTPEER``, a u64 little-endian header length N, N bytes of UTF-8
JSON padded with spaces to a multiple of 64, then the data section. The header is
``{"step": int, "meta": {...}, "tensors": [[name, dtype, shape, offset, nbytes], ...]}``; each
tensor's bytes (C order, native little-endian) start at a 64-byte aligned ``offset`` into the
data section. ``pack_snapshot`` lays the blob out before copying, then copies each tensor once
(from any device) into one preallocated uint8 tensor; ``unpack_snapshot`` copies them back out
into fresh tensors, so the result does not alias the blob.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["PeerSnapshot", "blob_crc", "check_blob", "pack_snapshot", "unpack_snapshot"]

_MAGIC = b"MOPTPEER"
_ALIGN = 64


class PeerSnapshot(NamedTuple):
    """A rank's snapshot: its step, named tensors (on the CPU) and JSON-able metadata."""

    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def blob_crc(blob: torch.Tensor) -> int:
    """zlib crc32 of a 1-D uint8 CPU tensor's bytes."""
    return zlib.crc32(blob.numpy().data)


def check_blob(blob: torch.Tensor) -> None:
    """Raise TypeError unless ``blob`` is a non-empty contiguous 1-D uint8 CPU tensor."""
    ok = isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.dim() == 1
    if not (ok and blob.device.type == "cpu" and blob.is_contiguous() and blob.numel() > 0):
        raise TypeError(f"blob must be a non-empty contiguous 1-D uint8 CPU tensor, got {blob!r}")


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to tensors, got {type(tensors)}")
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"tensors[{name!r}] has layout {t.layout}; only dense tensors pack")


def pack_snapshot(
    step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> torch.Tensor:
    """The snapshot as one 1-D uint8 CPU tensor (layout in the module docstring)."""
    _check_tensors(tensors)
    entries: list[tuple[str, str, list[int], int, int]] = []
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        dtype = str(t.dtype).removeprefix("torch.")
        entries.append((name, dtype, list(t.shape), offset, nbytes))
        offset = _round_up(offset + nbytes)
    try:
        text = json.dumps({"step": step, "meta": dict(meta), "tensors": entries})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta must be JSON-serializable (str keys, plain values): {exc}") from exc
    header = text.encode()
    header += b" " * (_round_up(16 + len(header)) - 16 - len(header))
    start = 16 + len(header)
    blob = torch.empty(start + offset, dtype=torch.uint8)
    prefix = bytearray(_MAGIC + struct.pack("<Q", len(header)) + header)
    blob[:start].copy_(torch.frombuffer(prefix, dtype=torch.uint8))
    for (_, _, _, off, nbytes), t in zip(entries, tensors.values(), strict=True):
        if nbytes:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            blob[start + off : start + off + nbytes].copy_(flat)
        # Zero the alignment gap: the same snapshot must always pack to the same bytes.
        blob[start + off + nbytes : start + _round_up(off + nbytes)].zero_()
    return blob


def unpack_snapshot(blob: torch.Tensor) -> PeerSnapshot:
    """Rebuild ``(step, tensors, meta)`` from a blob made by ``pack_snapshot``."""
    raw = bytes(blob[:16].numpy())
    if raw[:8] != _MAGIC:
        raise ValueError("not a memopt peer snapshot blob (bad magic); it is corrupt or foreign")
    (n,) = struct.unpack("<Q", raw[8:16])
    if 16 + n > blob.numel():
        raise ValueError(f"peer snapshot blob truncated: header of {n} bytes, blob {blob.numel()}")
    header = json.loads(bytes(blob[16 : 16 + n].numpy()).decode())
    start = 16 + n
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype_name, shape, off, nbytes in header["tensors"]:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"peer snapshot tensor {name!r} has unknown dtype {dtype_name!r}")
        out = torch.empty(shape, dtype=dtype)
        if nbytes:
            out.reshape(-1).view(torch.uint8).copy_(blob[start + off : start + off + nbytes])
        tensors[name] = out
    return PeerSnapshot(int(header["step"]), tensors, header["meta"])
