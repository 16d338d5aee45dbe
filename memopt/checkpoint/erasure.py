"""Erasure-coded stripes over a group of k + m ranks: layout and codec (no communication).

Layout (rotating parity, as in RAID-6). With ``W = k + m`` ranks there are ``W`` stripes.
Stripe ``s`` has parity holders ``P(s) = [(s + j) % W for j < m]`` and data contributors
``D(s) = [(s + m + i) % W for i < k]`` (the other k ranks). Rank ``r`` contributes data to the
k stripes whose parity it does not hold; its blob, zero-padded to ``k * seg`` bytes, is cut into
k segments of ``seg`` bytes and its i-th segment goes to the i-th of those stripes (ascending).
Each stripe's k + m blocks lie on k + m distinct ranks, so losing any m ranks loses at most m
blocks of every stripe and every blob can be rebuilt. Each rank holds parity for m stripes:
``m * seg`` bytes, i.e. ``m / k`` of a blob, against ``copies`` whole blobs for replication.

Codec: systematic Reed-Solomon over GF(2^8) from ``zfec`` (block numbers ``0..k-1`` are the
data blocks themselves, ``k..k+m-1`` the parity). The rebuild of a lost data block reads any k
surviving blocks of its stripe, data blocks first (they cost no decoding when all survive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "choose_blocks",
    "contributor_stripes",
    "data_contributors",
    "decode_block",
    "encode_parity",
    "parity_holders",
    "segment",
    "segment_size",
]

_MAX_BLOCKS = 256  # GF(2^8): at most 256 distinct blocks per stripe


def _zfec() -> Any:
    try:
        import zfec
    except ImportError as exc:  # optional dependency: only the erasure mode needs it
        raise ImportError(
            "RedundancyConfig(mode='erasure') needs the 'zfec' package; install it with "
            "`pip install zfec` (or `pip install memopt[redundancy]`), or use mode='replicate'"
        ) from exc
    return zfec


def check_code(k: int, m: int) -> None:
    """Raise ValueError unless k data + m parity blocks form a valid GF(2^8) code."""
    if k < 1 or m < 1 or k + m > _MAX_BLOCKS:
        raise ValueError(
            f"erasure coding needs k >= 1, m >= 1 and k + m <= {_MAX_BLOCKS}; got k={k}, m={m}"
        )


def parity_holders(stripe: int, world: int, m: int) -> list[int]:
    """The m ranks holding stripe ``stripe``'s parity blocks k, k+1, ..., in block order."""
    return [(stripe + j) % world for j in range(m)]


def data_contributors(stripe: int, world: int, m: int) -> list[int]:
    """The k = world - m ranks whose segments are stripe ``stripe``'s data blocks 0..k-1."""
    return [(stripe + m + i) % world for i in range(world - m)]


def contributor_stripes(rank: int, world: int, m: int) -> list[int]:
    """Stripes to which ``rank`` contributes data; its i-th segment goes to the i-th one."""
    return [s for s in range(world) if (rank - s) % world >= m]


def segment_size(max_blob_bytes: int, k: int) -> int:
    """Bytes per block: the largest blob of the group split into k parts (at least 1 byte)."""
    return max(1, -(-max_blob_bytes // k))


def segment(blob: torch.Tensor, index: int, seg: int) -> torch.Tensor:
    """The ``index``-th ``seg``-byte segment of a uint8 blob, zero-padded past its end.

    A segment fully inside the blob is a view (no copy); one that runs past the end is copied
    into a zero-filled buffer, so only the last segment or two of a short blob are copied.
    """
    start, stop = index * seg, (index + 1) * seg
    if stop <= blob.numel():
        return blob[start:stop]
    out = torch.zeros(seg, dtype=torch.uint8)
    if start < blob.numel():
        out[: blob.numel() - start].copy_(blob[start:])
    return out


def _view(block: torch.Tensor) -> memoryview:
    assert block.dtype == torch.uint8 and block.dim() == 1 and block.is_contiguous()
    return block.numpy().data


def _to_tensor(data: bytes, seg: int) -> torch.Tensor:
    out = torch.empty(seg, dtype=torch.uint8)
    out.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return out


def encode_parity(data_blocks: Sequence[torch.Tensor], m: int, which: int) -> torch.Tensor:
    """Parity block number ``k + which`` (0 <= which < m) of the k equal-size data blocks."""
    k = len(data_blocks)
    check_code(k, m)
    if not 0 <= which < m:
        raise ValueError(f"parity index must be in [0, {m}), got {which}")
    seg = data_blocks[0].numel()
    if any(b.numel() != seg for b in data_blocks):
        raise ValueError(f"data blocks differ in size: {[b.numel() for b in data_blocks]}")
    encoder = _zfec().Encoder(k, k + m)
    (parity,) = encoder.encode(tuple(_view(b) for b in data_blocks), (k + which,))
    return _to_tensor(parity, seg)


def decode_block(blocks: Mapping[int, torch.Tensor], k: int, m: int, want: int) -> torch.Tensor:
    """Data block ``want`` (< k) of a stripe from any k of its blocks, keyed by block number."""
    check_code(k, m)
    if len(blocks) != k:
        raise ValueError(f"decoding needs exactly k={k} blocks, got {sorted(blocks)}")
    if not 0 <= want < k:
        raise ValueError(f"only data blocks 0..{k - 1} are decoded, got block {want}")
    if want in blocks:
        return blocks[want]
    nums = tuple(sorted(blocks))
    seg = blocks[nums[0]].numel()
    decoder = _zfec().Decoder(k, k + m)
    out = decoder.decode(tuple(_view(blocks[n]) for n in nums), nums)
    return _to_tensor(out[want], seg)


def choose_blocks(
    stripe: int, world: int, m: int, has_data: Sequence[bool], has_parity: Sequence[bool]
) -> list[tuple[int, int]]:
    """k (block number, rank) pairs to rebuild stripe ``stripe`` from, data blocks first.

    ``has_data[r]``: rank r can supply its own data segment; ``has_parity[r]``: it holds the
    parity it was given. Raises ValueError when fewer than k blocks survive.
    """
    k = world - m
    found = [(i, r) for i, r in enumerate(data_contributors(stripe, world, m)) if has_data[r]]
    found += [(k + j, r) for j, r in enumerate(parity_holders(stripe, world, m)) if has_parity[r]]
    if len(found) < k:
        raise ValueError(
            f"stripe {stripe} keeps only {len(found)} of its k + m = {world} blocks "
            f"(ranks {[r for _, r in found]}); at least k = {k} are needed: more than m = {m} "
            "pieces were lost"
        )
    return found[:k]
