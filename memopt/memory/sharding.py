"""One rank's share of parameters, gradients and optimizer state under ZeRO stage 0-3.

Mirrors ``memopt.sharding`` (layer 2 may not import it; ``tests/memory/test_shard_share.py``
compares these figures with what 2 gloo ranks hold):

- placement (``plan.make_plans``): with ``whole_tensor`` each parameter is owned by one rank;
  with ``dim0`` (and always at stage 3) a parameter is row-sharded (``ceil(rows / W)`` rows
  per rank, as ``torch.chunk``) when every rank gets a row and its update is row-separable
  (``rowproj.row_reason``: full-state and 1-D parameters, FRUGAL block mode, and the
  right-sided projections of GaLore and FRUGAL with a dense or seeded basis), else owned
  whole. Owners are chosen greedily (heaviest first onto the least loaded rank, ties to the
  lowest, row shards counted as load), weighed as ``rowproj.state_weight`` does (elements:
  numel for full state, projected numel + half the basis for low-rank matrices). Plan order
  is ``param_groups``' (low-rank group first), which only breaks ties;
- optimizer state: a row shard keeps moments of its rows and, for a projection, the whole
  r x n basis (replicated on every rank); an owned parameter its whole state;
- parameters: whole on every rank at stages 0-2; at stage 3 FSDP2 keeps ``ceil(rows / W)``
  rows of every parameter on every rank (its padded shard), whatever the optimizer;
- gradients at the step (stages 1/2): the reduced buckets a rank keeps (``reduce``,
  ``plan.make_buckets``: by kind and dtype, in reverse plan order, up to ``bucket_bytes``):
  every row bucket's segment (``ceil(rows / W)`` rows of each of its parameters) and every
  whole bucket holding a tensor the rank owns (its gradient is a view of the bucket); then
  ``gather_params`` allocates every bucket's receive buffer at once (row buckets: all ranks'
  segments, plus the send segment; whole buckets: the bucket), the step's ``gather``
  temporaries; at stage 3 FSDP2's gradient shards, and on the owner of a whole matrix its
  gathered full parameter and gradient for the step (``fsdp_optim``: ``step_gathered``).
  With masters (``master_size``) the step's gradients are master-dtype: stages 1/2 copy
  the rank's part out of the buckets (which ``bwd_grads`` counts, for the backward), and
  FSDP2's gradient shards take the dtype of its parameter shards, which are the masters.

The figures are those of the rank with the most bytes in total. Frozen parameters
(``frozen_bytes``: no gradient, no state) are whole on every rank at stages 0-2 and
row-sharded with the rest at stage 3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memopt.memory.model import ParamInfo
from memopt.memory.optstate import matrix, projection, resolve, state_rule

#: rowproj.ROW_LOW_RANK / ROW_PROJECTORS, by the estimator's optimizer names
ROW_LOW_RANK = ("galore", "frugal")
ROW_PROJECTORS = ("svd", "rsvd", "gram", "subspace", "random", "orthogonal")


@dataclass(frozen=True)
class ShardShare:
    """Bytes one rank holds (the most loaded one)."""

    params: int  # parameters resident between steps
    grads: int  # gradients at the step
    state: int  # optimizer state (saved + cache)
    numel: int  # parameter elements whose update this rank owns (its master copy)
    gathered: int = 0  # stage 3: unsharded units live at once
    buckets: int = 0  # stages 1/2: gather_params' buffers after the inner step
    step_gathered: int = 0  # stage 3: full parameter + gradient of the matrices it owns whole
    rank: int = 0
    notes: list[str] = field(default_factory=list)
    frozen: int = 0  # the frozen parameters' bytes inside ``params`` (their shard at stage 3)
    #: gradients during the backward where they differ from ``grads`` (stages 1/2 with
    #: masters: the reduced buckets in the parameters' dtype; the master-dtype copies the
    #: step reads are made from them at the step)
    bwd_grads: int | None = None


@dataclass(frozen=True)
class Placement:
    """One parameter's place (``plan.ParamPlan``): row-sharded (owner None) or owned whole."""

    info: ParamInfo
    state_info: ParamInfo  # the same parameter in the dtype the optimizer steps
    owner: int | None
    rows: int
    cols: int
    chunk: int  # ceil(rows / W)

    def local_rows(self, rank: int) -> int:
        if self.owner is not None:
            return self.rows if rank == self.owner else 0
        start = min(rank * self.chunk, self.rows)
        return min(start + self.chunk, self.rows) - start


def _projected(p: ParamInfo, kw: Mapping[str, Any]) -> bool:
    """Whether a projector steps ``p`` (a low-rank target of a low-rank optimizer)."""
    sized = "rank" in kw or "density" in kw  # (adamw: no size, no projector)
    return sized and p.low_rank and len(p.shape) >= 2 and kw.get("proj") != "block"


def row_reason(p: ParamInfo, optimizer: str, kw: Mapping[str, Any]) -> str:
    """ "" if ``dim0`` may row-shard ``p`` (``rowproj.row_reason``), else why not."""
    if not _projected(p, kw):
        return ""
    if optimizer not in ROW_LOW_RANK:
        return f"{optimizer}'s low-rank update needs the whole matrix"
    if kw.get("proj") not in ROW_PROJECTORS:
        return f"projector {kw.get('proj')!r} indexes the whole matrix"
    side = projection(matrix(p.shape), kw).side
    return "" if side == "right" else f"a {side}-sided projection mixes rows"


def state_weight(p: ParamInfo, kw: Mapping[str, Any]) -> int:
    """What owners are balanced on (``rowproj.state_weight``: elements, from the
    projector's own ``low_shape`` / ``rank_for``)."""
    if not _projected(p, kw):
        return p.numel
    shape = matrix(p.shape)
    proj = projection(shape, kw)
    side = shape[1] if proj.side == "right" else shape[0]
    return max(1, proj.low_numel + proj.rank * side // 2)


def place(
    infos: Sequence[ParamInfo],
    state_infos: Sequence[ParamInfo],
    world: int,
    layout: str,
    optimizer: str = "adamw",
    kwargs: Mapping[str, Any] | None = None,
) -> list[Placement]:
    """Every parameter's placement, in plan order (``plan.make_plans``)."""
    kw = resolve(optimizer, kwargs)
    order = sorted(range(len(infos)), key=lambda i: not infos[i].low_rank)  # stable
    plans = []
    for i in order:
        p = infos[i]
        rows, cols = matrix(p.shape)
        chunk = -(-rows // world) if rows else 0
        whole = layout != "dim0" or not rows or (world - 1) * chunk >= rows
        whole = whole or bool(row_reason(p, optimizer, kw))
        plans.append(Placement(p, state_infos[i], -1 if whole else None, rows, cols, chunk))
    load = [0.0] * world
    weight = [state_weight(pl.info, kw) for pl in plans]
    for pl, w in zip(plans, weight, strict=True):
        if pl.owner is None:
            for r in range(world):
                load[r] += w * pl.local_rows(r) * pl.cols / max(1, pl.info.numel)
    out = list(plans)
    for i in sorted((i for i, pl in enumerate(plans) if pl.owner == -1), key=lambda i: -weight[i]):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += weight[i]
        pl = plans[i]
        out[i] = Placement(pl.info, pl.state_info, r, pl.rows, pl.cols, pl.rows)
    return out


def buckets(plans: Sequence[Placement], bucket_bytes: int) -> list[list[Placement]]:
    """``plan.make_buckets``: one open bucket per (row-sharded?, dtype), in reverse plan
    order, a new one when the next parameter would pass ``bucket_bytes``."""
    out: list[list[Placement]] = []
    open_: dict[tuple[bool, Any], tuple[list[Placement], list[int]]] = {}
    for pl in reversed(plans):
        key = (pl.owner is None, pl.info.dtype)
        size = pl.chunk * pl.cols * pl.info.dtype.itemsize
        b = open_.get(key)
        if b is None or (b[0] and b[1][0] + size > bucket_bytes):
            b = open_[key] = ([], [0])
            out.append(b[0])
        b[0].append(pl)
        b[1][0] += size
    return out


def _bucket_bytes(bucket: list[Placement]) -> int:
    """A row bucket's segment (per rank) or a whole bucket's bytes."""
    return sum(pl.chunk * pl.cols * pl.info.dtype.itemsize for pl in bucket)


def rank_shares(
    infos: Sequence[ParamInfo],
    stage: int,
    world: int,
    layout: str,
    optimizer: str = "adamw",
    kwargs: Mapping[str, Any] | None = None,
    state_infos: Sequence[ParamInfo] | None = None,
    bucket_bytes: int = 25 * 2**20,
    master_size: int = 0,
) -> list[ShardShare]:
    """Every rank's share at stage 1-3 (without the frozen and stage-3 gathered figures).
    With masters (``master_size`` bytes per element) the gradients the step reads are
    master-dtype copies of this rank's part (stages 1/2: the bf16 buckets are then freed;
    stage 3: FSDP2's fp32 shards)."""
    state_infos = list(state_infos or infos)
    rule = state_rule(state_infos, optimizer, kwargs)
    plans = place(infos, state_infos, world, "dim0" if stage == 3 else layout, optimizer, kwargs)
    p_bytes = sum(p.nbytes for p in infos)
    fsdp = [-(-pl.rows // world) * pl.cols for pl in plans]  # FSDP2's row shard, every tensor
    shards = sum(n * pl.info.dtype.itemsize for n, pl in zip(fsdp, plans, strict=True))
    bucketed = [(b[0].owner is None, _bucket_bytes(b), b) for b in buckets(plans, bucket_bytes)]
    gather = sum((world + 1) * n if rows else n for rows, n, _ in bucketed)
    out = []
    for r in range(world):
        state = numel = gathered = 0
        for pl in plans:
            rows = pl.local_rows(r)
            if not rows:
                continue
            saved, cache = rule(pl.state_info, None if pl.owner is not None else rows)
            state += saved + cache
            numel += rows * pl.cols
            gathered += 2 * pl.info.nbytes if pl.owner is not None else 0
        if stage == 3:
            numel = sum(fsdp)
            grads = numel * master_size if master_size else shards
            out.append(ShardShare(shards, grads, state, numel, step_gathered=gathered, rank=r))
            continue
        kept = sum(n for rows, n, b in bucketed if rows or any(pl.owner == r for pl in b))
        grads = numel * master_size if master_size else kept
        out.append(ShardShare(p_bytes, grads, state, numel, buckets=gather, rank=r,
                              bwd_grads=kept if master_size else None))  # fmt: skip
    return out


def shard_share(
    infos: Sequence[ParamInfo],
    optimizer: str,
    kwargs: Mapping[str, Any] | None,
    stage: int,
    world: int,
    layout: str,
    unit_bytes: int,  # stage 3: parameter bytes unsharded at once
    bucket_bytes: int = 25 * 2**20,
    frozen_bytes: int = 0,
    state_infos: Sequence[ParamInfo] | None = None,
    master_size: int = 0,  # bytes per element of a master copy of the owned shard (0: none)
) -> ShardShare:
    """The most loaded rank's share (see the module docstring)."""
    p_bytes = sum(p.nbytes for p in infos)
    if stage == 0 or world == 1:
        rule = state_rule(list(state_infos or infos), optimizer, kwargs)
        state = sum(sum(rule(p, None)) for p in (state_infos or infos))
        numel = sum(p.numel for p in infos)
        return ShardShare(p_bytes + frozen_bytes, p_bytes, state, numel, frozen=frozen_bytes)
    shares = rank_shares(
        infos, stage, world, layout, optimizer, kwargs, state_infos, bucket_bytes, master_size
    )

    def total(s: ShardShare) -> int:
        return s.params + s.grads + s.state + s.numel * master_size + s.step_gathered

    worst = max(shares, key=lambda s: (total(s), -s.rank))
    if stage == 3:
        frozen = -(-frozen_bytes // world)
        return ShardShare(
            worst.params + frozen, worst.grads, worst.state, worst.numel,
            gathered=min(unit_bytes, p_bytes + frozen_bytes), step_gathered=worst.step_gathered,
            rank=worst.rank, frozen=frozen,
        )  # fmt: skip
    notes = []
    if layout == "whole_tensor":
        notes.append(f"stage {stage} whole_tensor: a rank keeps every gradient bucket in which "
                     "it owns a tensor until the step")  # fmt: skip
    return ShardShare(
        worst.params + frozen_bytes, worst.grads, worst.state, worst.numel,
        buckets=worst.buckets, rank=worst.rank, notes=notes, frozen=frozen_bytes,
        bwd_grads=worst.bwd_grads,
    )  # fmt: skip
