"""Checkpoint files: safetensors with every tensor aligned, and a per-file checksum.

Layout (the safetensors format, readable by ``safetensors.safe_open``): an 8-byte little-endian
header length N, N bytes of JSON (``{name: {dtype, shape, data_offsets}}``, space-padded so
that ``8 + N`` is a multiple of the alignment), then the data section. Each tensor starts at a
multiple of the alignment (4096 by default: ``O_DIRECT`` and GPUDirect friendly). The format
forbids holes in the data section, so the gaps between tensors are declared as ``U8`` tensors
named ``__pad__.<k>``; readers skip them. ``plan_file`` computes the header and offsets before
any byte is copied, so the host staging buffer is laid out exactly as the data section and the
writer (``writer.py``) writes straight from it, in large aligned pieces.

The checksum (crc32c when the ``crc32c`` package is present, else zlib's crc32) covers the
whole file; it is computed while staging CPU tensors (``copy_crc``, one pass with the copy)
or else while writing (``checksum.py``: in pieces, combined), and again while reading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memopt.checkpoint.checksum import checksum_fn, resolve_checksum  # noqa: F401 (re-exported)
from memopt.checkpoint.errors import CorruptSnapshotError
from memopt.checkpoint.writer import Engines, write_data_file

PAD_PREFIX = "__pad__."
_CHUNK = 64 << 20  # read size of file_checksum

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class FilePlan:
    """Where each tensor lies in the data section, and the header bytes."""

    header: bytes  # length prefix + JSON, padded to the alignment
    offsets: dict[str, int]  # tensor name -> byte offset in the data section
    data_bytes: int
    pads: list[tuple[int, int]]  # [start, end) of the padding between tensors


def plan_file(
    tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    alignment: int,
    metadata: dict[str, str] | None = None,
) -> FilePlan:
    """Aligned offsets for ``(name, dtype, shape)`` and the padded header."""
    entries: dict[str, dict[str, object]] = {}
    offsets: dict[str, int] = {}
    pos = 0
    pads: list[tuple[int, int]] = []
    for i, (name, dtype, shape) in enumerate(tensors):
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"checkpoint: tensor {name!r} has dtype {dtype}, not storable")
        start = _round_up(pos, alignment)
        if start > pos:
            pads.append((pos, start))
            entries[f"{PAD_PREFIX}{i}"] = {
                "dtype": "U8",
                "shape": [start - pos],
                "data_offsets": [pos, start],
            }
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        entries[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": [int(s) for s in shape],
            "data_offsets": [start, start + nbytes],
        }
        offsets[name] = start
        pos = start + nbytes
    end = _round_up(pos, alignment)  # a whole number of aligned blocks (O_DIRECT writes)
    if end > pos:
        pads.append((pos, end))
        entries[f"{PAD_PREFIX}end"] = {
            "dtype": "U8",
            "shape": [end - pos],
            "data_offsets": [pos, end],
        }
        pos = end
    head: dict[str, object] = {"__metadata__": dict(metadata or {})}
    head.update(entries)
    raw = json.dumps(head, separators=(",", ":")).encode()
    n = _round_up(8 + len(raw), alignment) - 8
    header = n.to_bytes(8, "little") + raw + b" " * (n - len(raw))
    return FilePlan(header, offsets, pos, pads)


def write_file(
    path: str,
    plan: FilePlan,
    data: torch.Tensor,
    checksum: str,
    fsync: bool,
    direct: bool = False,
    ready: Callable[[int], None] | None = None,
    engines: Engines | None = None,
    known_checksum: Callable[[], int | None] | None = None,
) -> int:
    """Write header + ``data`` (uint8, ``plan.data_bytes``) to a new file; returns the checksum.

    ``direct``: open with ``O_DIRECT`` (bypass the page cache) when the file system allows it
    and ``data`` is page-aligned; the plan's sizes are alignment multiples, so every write is.
    ``ready(n)`` blocks until the first ``n`` bytes of ``data`` hold their values (the
    writer follows the copy into staging chunk by chunk). How: ``writer.write_data_file``
    (preallocated file, several writes in flight, checksum overlapped with the I/O), through
    ``engines`` when given (kept across files: see ``writer.Engines``); ``known_checksum()``
    gives the checksum when the copier already computed it (else None).
    """
    return write_data_file(
        path, plan.header, data[: plan.data_bytes], checksum, fsync, direct, ready, engines,
        known_checksum,
    )


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_checksum(path: str, checksum: str) -> int:
    crc = checksum_fn(checksum)
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = crc(chunk, value)
    return value


def read_file(path: str, checksum: str | None, expected: int | None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file (pads skipped), after checking its checksum."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise CorruptSnapshotError(f"checkpoint file {path} cannot be read: {e}") from e
    if checksum is not None and expected is not None:
        got = checksum_fn(checksum)(memoryview(raw.data), 0)
        if got != expected:
            raise CorruptSnapshotError(
                f"checkpoint file {path} fails its {checksum} checksum (stored {expected:#010x}, "
                f"computed {got:#010x}): the file is corrupted or was changed after the save"
            )
    return parse(raw, path)


def parse(raw: np.ndarray, path: str) -> dict[str, torch.Tensor]:
    buf = torch.from_numpy(raw)
    size = buf.numel()
    n = int.from_bytes(raw[:8].tobytes(), "little") if size >= 8 else -1
    if n < 0 or 8 + n > size:
        raise CorruptSnapshotError(f"checkpoint file {path} is truncated (header of {n} bytes)")
    try:
        head = json.loads(raw[8 : 8 + n].tobytes())
    except ValueError as e:
        raise CorruptSnapshotError(f"checkpoint file {path} has a malformed header: {e}") from e
    out: dict[str, torch.Tensor] = {}
    base = 8 + n
    for name, info in head.items():
        if name == "__metadata__" or name.startswith(PAD_PREFIX):
            continue
        lo, hi = (base + int(x) for x in info["data_offsets"])
        if hi > size:
            raise CorruptSnapshotError(f"checkpoint file {path} is truncated at tensor {name!r}")
        dtype = NAME_DTYPES[info["dtype"]]
        part = buf[lo:hi]
        if lo % torch.empty((), dtype=dtype).element_size():
            part = part.clone()
        out[name] = part.view(dtype).view(info["shape"])
    return out
