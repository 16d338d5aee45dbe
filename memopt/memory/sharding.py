"""One rank's share of parameters, gradients and optimizer state under ZeRO stage 0-3.

Mirrors ``memopt.sharding.plan`` (layer 2 may not import it): with ``whole_tensor`` each
parameter is owned by one rank, owners chosen greedily (heaviest state first onto the least
loaded rank, ties to the lowest), so the worst rank carries at most one parameter more than
1/W; with ``dim0`` a full-state parameter whose rows cover every rank is row-sharded
(``ceil(rows / W)`` rows on rank 0, the largest share) and low-rank ones stay whole. The
figures are for the most loaded rank. Frozen parameters (``frozen_bytes``: no gradient, no
state) are whole on every rank at stages 0-2 and row-sharded with the rest at stage 3 (FSDP2
shards every parameter of a unit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memopt.memory.model import ParamInfo
from memopt.memory.optstate import StateEstimate


@dataclass(frozen=True)
class ShardShare:
    """Bytes one rank holds (the most loaded one)."""

    params: int  # parameters resident between steps
    grads: int  # gradients at the step
    state: int  # optimizer state (saved + cache)
    numel: int  # parameter elements whose update this rank owns
    gathered: int = 0  # stage 3: unsharded units live at once
    buckets: int = 0  # stages 1/2: bucket buffers beside the gradients at the step
    notes: list[str] = field(default_factory=list)


def _row_share(p: ParamInfo, world: int) -> float | None:
    """Fraction of ``p`` on rank 0 when row-sharded, or None when it stays whole."""
    rows = p.shape[0] if p.shape else 1
    chunk = -(-rows // world)
    if p.low_rank or not rows or (world - 1) * chunk >= rows:
        return None
    return chunk / rows


def _owned(
    infos: Sequence[ParamInfo], state: StateEstimate, world: int, layout: str
) -> tuple[float, float, float]:
    """(state bytes, parameter elements, parameter bytes) of the most loaded rank."""
    load = [0.0] * world
    numel = [0.0] * world
    nbytes = [0.0] * world
    whole = []
    for p in infos:
        frac = _row_share(p, world) if layout == "dim0" else None
        if frac is None:
            whole.append(p)
            continue
        for r in range(world):
            load[r] += state.per_param[p.name] * frac if r == 0 else state.per_param[p.name] / world
        numel[0] += p.numel * frac
        nbytes[0] += p.nbytes * frac
    for p in sorted(whole, key=lambda q: -state.per_param[q.name]):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += state.per_param[p.name]
        numel[r] += p.numel
        nbytes[r] += p.nbytes
    worst = max(range(world), key=lambda k: (load[k], -k))
    return load[worst], numel[worst], nbytes[worst]


def shard_share(
    infos: Sequence[ParamInfo],
    state: StateEstimate,
    stage: int,
    world: int,
    layout: str,
    unit_bytes: int,  # stage 3: parameter bytes unsharded at once
    bucket_bytes: int = 25 * 2**20,
    frozen_bytes: int = 0,
) -> ShardShare:
    """The most loaded rank's share (see the module docstring)."""
    p_bytes = sum(p.nbytes for p in infos)
    total_numel = sum(p.numel for p in infos)
    cache_ratio = state.cache / max(1, state.total)
    if stage == 0 or world == 1:
        return ShardShare(p_bytes + frozen_bytes, p_bytes, state.memory, total_numel)
    s, n, nb = _owned(infos, state, world, layout)
    s_mem = int(s * (1 + cache_ratio))
    buckets = min(bucket_bytes, p_bytes)
    if stage in (1, 2):
        grads = p_bytes
        notes = []
        if stage == 2 and layout == "dim0":
            grads, buckets = int(nb), min(2 * bucket_bytes, p_bytes)
        elif stage == 2:  # gradients move into the buckets during backward: no extra copy
            buckets = 0
            notes.append("stage 2 whole_tensor: gradients stay in their buckets until the step")
        return ShardShare(
            p_bytes + frozen_bytes, grads, s_mem, int(n), buckets=buckets, notes=notes
        )
    gathered = min(unit_bytes, p_bytes + frozen_bytes)
    params = int(nb) + -(-frozen_bytes // world)
    return ShardShare(params, int(nb), s_mem, int(n), gathered=gathered)
