"""Offloaded optimizer state at stages 0-2 when the optimizer keeps its own state.

With ``offload=`` and an optimizer whose state is not fp32 AdamW's (low-rank, 8/4-bit
moments), ``memopt.shard`` wraps it in ``memopt.offload``'s ``StateOffloadedOptimizer``, whose
``StateStore`` moves the state **tensor by tensor** (layer 2 may not import its sibling, so
this module restates what it does; ``tests/memory/test_offload_state.py`` checks it against
real runs):

- after each parameter's update every state tensor of at least ``MIN_STATE_BYTES``
  (``OffloadConfig.min_state_bytes``) is written to the tier, one write per tensor; smaller
  ones (step scalars, small bases and norms' moments) stay in memory with the parameter;
- at most ``STATE_WRITES`` writes are in flight: ``max_writes=2`` and the one just submitted,
  before the oldest is waited for;
- on the NVMe tier a write whose source is not page-aligned (every tensor the optimizer itself
  created: all of them in the first step, a refreshed basis later) goes through a bounce block
  of its size, rounded up to a page, from the pinned arena, freed when the write is done.
  Tensors read back from the file are page-aligned (``state_store._aligned_empty``, pageable
  memory), so later writes move them in place and bounce one page of a tail at most. The
  pinned peak is therefore at most the largest sum of ``STATE_WRITES`` consecutive writes of
  the first step, reached when the disk is slower than the updates (a fast disk finishes most
  writes before the next one starts: one to three of them are seen at once) and no source
  happens to start on a page boundary (one that does is written in place, with a page of
  tail bounced at most);
- each write goes to a shadow slot of the swap file, which replaces the old slot when done.

The swap file itself (``memopt.offload.nvme_file``) is preallocated to
``NVMeConfig.capacity_bytes`` when the tier opens and grows by ``grow_bytes`` when full, so
the disk space taken is the capacity whatever the state weighs, as long as it fits
(``swap_file_bytes``).

Per parameter the tensors come in the optimizer's order: the projector's (basis ``P`` then
``Q``, or the index vectors), Natural GaLore's history and its Gram matrix, the two moments
(8/4-bit: codes and absmax of each), APOLLO's limiter scalar. Parameters come in plan order
(``sharding.place``: the low-rank group first, as ``memopt.optim.param_groups`` builds them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from memopt.memory.model import ParamInfo
from memopt.memory.optstate import (
    INDEX_BYTES,
    INDEX_PROJ,
    LOWBIT_BLOCK,
    MIN_LOWBIT_NUMEL,
    _block_active,
    matrix,
    projection,
    resolve,
)
from memopt.memory.sharding import place

__all__ = [
    "MIN_STATE_BYTES", "NVME_CAPACITY_BYTES", "NVME_GROW_BYTES", "PAGE", "STATE_WRITES",
    "OwnStateOffload", "own_state_offload", "swap_file_bytes", "tensor_rule",
]  # fmt: skip

#: OffloadConfig.min_state_bytes' default: smaller state tensors stay in memory
MIN_STATE_BYTES = 4096
#: StateOffloadedOptimizer's max_writes (2) plus the write submitted before the oldest is waited
STATE_WRITES = 3
#: NVMeConfig's defaults (tests/memory pin them equal): the swap file's preallocated size and
#: growth step
NVME_CAPACITY_BYTES = 1 << 30
NVME_GROW_BYTES = 256 << 20
PAGE = 4096

#: (parameter, rows of a row shard or None) -> its state tensors' bytes, in creation order
TensorRule = Callable[[ParamInfo, int | None], list[int]]


def _round(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _moments(numel: int, itemsize: int, state_dtype: str | None) -> list[int]:
    """Adam's two moments of ``numel`` elements (8/4-bit: codes and absmax of each)."""
    if state_dtype in LOWBIT_BLOCK and numel >= MIN_LOWBIT_NUMEL:
        codes = numel if state_dtype == "int8" else -(-numel // 2)
        absmax = 4 * -(-numel // LOWBIT_BLOCK[state_dtype])
        return [codes, absmax, codes, absmax]
    size = 4 if state_dtype is not None else itemsize
    return [numel * size, numel * size]


def _projector(shape: tuple[int, int], kw: Mapping[str, Any], size: int) -> list[int]:
    """The projector's tensors (``optstate._kept``, one entry per tensor)."""
    m, n = shape
    proj = projection(shape, kw)
    r, name = proj.rank, kw["proj"]
    if name == "coordinate":
        return [INDEX_BYTES * r]
    if name in INDEX_PROJ:  # kept rows, then kept columns
        rows = {"right": m, "left": r, "both": r}[proj.side]
        cols = {"right": r, "left": n, "both": r}[proj.side]
        return [INDEX_BYTES * rows, INDEX_BYTES * cols]
    return {"right": [r * n * size], "left": [m * r * size],
            "both": [m * r * size, r * n * size]}[proj.side]  # fmt: skip


def tensor_rule(
    params: Sequence[ParamInfo], optimizer: str, kwargs: Mapping[str, Any] | None = None
) -> TensorRule:
    """``rule(p, rows)``: the bytes of each state tensor of ``p`` (or of its row shard of
    ``rows`` rows), in the order the optimizer creates them; they sum to ``optstate``'s
    saved + cache bytes of ``p``."""
    kw = resolve(optimizer, kwargs)
    sd = kw.get("state_dtype")
    active = _block_active(params, kw) if optimizer == "frugal" and kw.get("proj") == "block" \
        else None  # fmt: skip

    def full(p: ParamInfo, rows: int | None) -> list[int]:
        m, n = matrix(p.shape)
        return _moments(p.numel if rows is None else rows * n, p.dtype.itemsize, sd)

    def rule(p: ParamInfo, rows: int | None) -> list[int]:
        if active is not None:
            return full(p, rows) if not p.low_rank or p.name in active else []
        if optimizer == "adamw" or not p.low_rank or len(p.shape) < 2:
            return full(p, rows)
        shape = matrix(p.shape)
        proj = projection(shape, kw)
        low = proj.low_numel if rows is None else rows * proj.rank
        # any state_dtype computes (and keeps the basis) in fp32, as optstate says
        out = _projector(shape, kw, 4 if sd is not None else p.dtype.itemsize)
        if optimizer == "natural_galore":
            s, hist_size = int(kw.get("natural_history", 4)), max(4, p.dtype.itemsize)
            out += [s * low * hist_size, s * s * hist_size]
        out += _moments(low, p.dtype.itemsize, sd)
        if optimizer in ("apollo", "apollo_mini"):
            out.append(4)  # the norm-growth limiter's fp32 scalar
        return out

    return rule


@dataclass(frozen=True)
class OwnStateOffload:
    """One rank's state under ``StateOffloadedOptimizer`` (see the module docstring)."""

    on_tier: int  # bytes of the tensors the tier holds (its report's requested bytes)
    in_memory: int  # bytes of the tensors under MIN_STATE_BYTES, kept with the parameters
    bounce: int  # NVMe: pinned bounce bytes at the peak (STATE_WRITES consecutive writes)
    file_need: int  # NVMe: swap-file bytes the slots take at the peak (pages + shadow slots)


def own_state_offload(
    infos: Sequence[ParamInfo],
    state_infos: Sequence[ParamInfo],
    optimizer: str,
    kwargs: Mapping[str, Any] | None,
    stage: int,
    world: int,
    layout: str,
    rank: int,
) -> OwnStateOffload:
    """The split and the NVMe costs for ``rank`` (the estimate's most loaded one)."""
    rule = tensor_rule(state_infos, optimizer, kwargs)
    if stage == 0 or world == 1:
        order = sorted(range(len(infos)), key=lambda i: not infos[i].low_rank)  # stable
        local: list[tuple[ParamInfo, int | None]] = [(state_infos[i], None) for i in order]
    else:
        local = []
        for pl in place(infos, state_infos, world, layout, optimizer, kwargs):
            rows = pl.local_rows(rank)
            if rows:
                local.append((pl.state_info, None if pl.owner is not None else rows))
    sizes = [b for p, rows in local for b in rule(p, rows)]
    written = [b for b in sizes if b >= MIN_STATE_BYTES]
    pages = [_round(b) for b in written]
    window = max((sum(pages[i : i + STATE_WRITES]) for i in range(len(pages))), default=0)
    return OwnStateOffload(
        on_tier=sum(written), in_memory=sum(sizes) - sum(written), bounce=window,
        file_need=sum(pages) + window,
    )  # fmt: skip


def swap_file_bytes(
    need: int, capacity: int = NVME_CAPACITY_BYTES, grow: int = NVME_GROW_BYTES
) -> int:
    """Size of a swap file preallocated to ``capacity`` once its slots need ``need`` bytes:
    the capacity, exactly, while ``need`` fits; past it, at least the capacity plus whole
    ``grow`` steps (the tier grows by ``max(grow_bytes, the request that did not fit)``
    wherever the free list has no slot for a request, so fragmentation and large tensors make
    it somewhat larger). ``grow`` 0: it never grows; the tier raises ENOSPC instead."""
    if need <= capacity or grow <= 0:
        return capacity
    return capacity + -(-(need - capacity) // grow) * grow
