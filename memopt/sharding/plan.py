"""Which rank holds which part of each parameter, and the communication buckets.

Every parameter of the optimizer gets one ``ParamPlan``, identical on every rank (a pure
function of shapes, dtypes, group options and world size):

- *row-sharded* (``owner is None``, layout ``dim0``): the parameter, viewed as
  ``rows x cols`` (dim 0 x the rest), is split like ``torch.chunk`` / FSDP2: rank r holds rows
  ``[r c, min((r+1) c, rows))`` with ``c = ceil(rows / W)``. Only parameters that give every
  rank at least one row and whose update is row-separable are row-sharded (``rows_ok``).
- *owned whole* (``owner = r``): rank r holds all of it (every parameter under
  ``whole_tensor``; under ``dim0`` those the row rule excludes). Owners are chosen greedily,
  largest first, onto the least loaded rank (ties to the lowest rank): the imbalance is at
  most the largest owned parameter.

Buckets group parameters of one kind (rows / whole) and dtype, in reverse registration order
(the order backward usually produces gradients), up to ``bucket_bytes`` each; they are the
unit of every gradient reduction and parameter gather, launched in index order on every rank.
A row bucket is laid out rank-major: segment r holds rank r's rows of every parameter, each
padded to ``c * cols``, so one ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` serves
the whole bucket. A whole bucket is ordered by owner: one reduce (or broadcast) per owner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def chunk_rows(rows: int, chunk: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``rank`` when ``rows`` are cut in pieces of ``chunk`` (the
    ``torch.chunk`` split FSDP2's ``Shard(0)`` uses with ``chunk = ceil(rows / world)``)."""
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


@dataclass(eq=False)
class ParamPlan:
    """One parameter's placement and its offset in its bucket."""

    index: int  # 0-based position over all param groups (the same on every rank)
    param: Tensor  # the model parameter (full size)
    group: int  # which param group
    owner: int | None  # None: row-sharded over all ranks; else the rank that owns it whole
    rows: int
    cols: int
    chunk: int  # rows per rank for row sharding; ``rows`` when owned whole
    why_whole: str = ""  # the reason a dim0 parameter is owned whole (for the report)
    offset: int = 0  # element offset in its bucket (in each rank segment for row buckets)

    def row_range(self, rank: int) -> tuple[int, int]:
        if self.owner is not None:
            return (0, self.rows) if rank == self.owner else (0, 0)
        return chunk_rows(self.rows, self.chunk, rank)

    def local_numel(self, rank: int) -> int:
        s, e = self.row_range(rank)
        return (e - s) * self.cols

    @property
    def seg_numel(self) -> int:
        """Elements this parameter takes in a bucket (per rank segment for row buckets)."""
        return self.chunk * self.cols if self.owner is None else self.rows * self.cols


@dataclass(eq=False)
class Bucket:
    """Parameters reduced and gathered together."""

    index: int
    rows: bool  # row bucket (reduce-scatter / all-gather) or whole bucket (reduce / broadcast)
    dtype: torch.dtype
    plans: list[ParamPlan] = field(default_factory=list)
    numel: int = 0  # per-segment numel for row buckets, total numel for whole buckets

    def owner_spans(self) -> list[tuple[int, int, int]]:
        """(owner, start, end) element spans of a whole bucket, one per owner present."""
        spans: list[tuple[int, int, int]] = []
        for p in self.plans:
            assert p.owner is not None
            end = p.offset + p.seg_numel
            if spans and spans[-1][0] == p.owner:
                spans[-1] = (p.owner, spans[-1][1], end)
            else:
                spans.append((p.owner, p.offset, end))
        return spans


def matrix_shape(p: Tensor) -> tuple[int, int]:
    rows = int(p.shape[0]) if p.dim() > 0 else 1
    return rows, (p.numel() // rows if rows else 0)


def make_plans(
    groups: list[list[Tensor]],
    world: int,
    layout: str,
    rows_ok: Callable[[int, Tensor], str],
    weight: Callable[[int, Tensor], int] | None = None,
) -> list[ParamPlan]:
    """Place every parameter. ``rows_ok(group_index, p)`` returns "" when ``p`` may be
    row-sharded, else the reason it must be owned whole; ``weight(group_index, p)`` is what
    owners are balanced on (default: numel)."""
    plans: list[ParamPlan] = []
    index = 0
    for gi, params in enumerate(groups):
        for p in params:
            rows, cols = matrix_shape(p)
            chunk = -(-rows // world) if rows else 0
            why = "layout whole_tensor"
            if layout == "dim0":
                why = "" if rows and (world - 1) * chunk < rows else "fewer rows than ranks"
                why = why or rows_ok(gi, p)
            owner = None if not why else -1
            plans.append(
                ParamPlan(index, p, gi, owner, rows, cols, chunk if not why else rows, why)
            )
            index += 1
    w = {p.index: (weight(p.group, p.param) if weight else p.param.numel()) for p in plans}
    _assign_owners(plans, world, w)
    return plans


def _assign_owners(plans: list[ParamPlan], world: int, weight: dict[int, int]) -> None:
    """Greedy: heaviest first onto the least loaded rank, row shards counted as load."""
    load = [0.0] * world
    for p in plans:
        if p.owner is None:
            for r in range(world):
                load[r] += weight[p.index] * p.local_numel(r) / max(1, p.param.numel())
    whole = sorted((p for p in plans if p.owner == -1), key=lambda p: (-weight[p.index], p.index))
    for p in whole:
        r = min(range(world), key=lambda k: (load[k], k))
        p.owner = r
        load[r] += weight[p.index]


def make_buckets(plans: list[ParamPlan], bucket_bytes: int) -> list[Bucket]:
    """Buckets in reverse parameter order, one open bucket per (kind, dtype)."""
    buckets: list[Bucket] = []
    open_: dict[tuple[bool, torch.dtype], Bucket] = {}
    for p in sorted(plans, key=lambda p: -p.index):
        key = (p.owner is None, p.param.dtype)
        b = open_.get(key)
        size = p.seg_numel * p.param.element_size()
        if b is None or (b.plans and (b.numel * p.param.element_size() + size) > bucket_bytes):
            b = Bucket(len(buckets), key[0], key[1])
            buckets.append(b)
            open_[key] = b
        b.plans.append(p)
        b.numel += p.seg_numel
    for b in buckets:
        if not b.rows:  # contiguous span per owner
            b.plans.sort(key=lambda p: p.owner)  # type: ignore[arg-type, return-value]
        offset = 0
        for p in b.plans:
            p.offset = offset
            offset += p.seg_numel
    return buckets


def balance(plans: list[ParamPlan], world: int) -> dict[str, object]:
    """Elements each rank holds (row shards + owned tensors), and the slack over 1/W."""
    held = [sum(p.local_numel(r) for p in plans) for r in range(world)]
    total = sum(p.param.numel() for p in plans)
    ideal = total / world if world else 0.0
    slack = (max(held) / ideal - 1.0) if ideal else 0.0
    return {"numel_per_rank": held, "total_numel": total, "slack": slack}
