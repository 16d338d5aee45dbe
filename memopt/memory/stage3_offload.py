"""Where stage-3 bytes live when parameter shards or optimizer state leave the device.

Stage 3 (FSDP2) keeps, per rank, a 1/W row shard of every parameter, its gradient and its
optimizer state. Two options move them (``memopt.shard(..., stage=3, offload_params=...,
offload=...)``); this module gives, for each of the estimate's two moments (the
forward/backward peak and the optimizer step), what stays in memory:

- ``offload_params="cpu"`` (FSDP2's ``CPUOffloadPolicy``): parameter shards, their gradients
  and the optimizer state (which follows the parameters) live in host memory (pinned when a
  GPU is present, pageable otherwise); the device keeps the gathered units, the activations
  and the backward's temporaries; the step runs on the host. On a CPU run nothing moves
  (the device is host memory).
- ``offload_params="nvme"`` (``memopt.sharding.param_swap.ParamSwapper``, ``lookahead=1``):
  the shards live in the NVMe file (the disk column). What is in memory follows the swapper:

  * forward/backward, steady state: a unit is evicted right after its all-gather, unless it
    is within the lookahead window. FSDP2 gathers the root unit (embeddings, head, final
    norm) once, first in the forward, and keeps it unsharded through the backward, and the
    swapper keeps it resident from the end of the previous step (it heads the cycle), so
    the reads of the forward/backward are of the blocks only. Between gathers (where the
    backward's peak is) the ``lookahead`` units read ahead are resident, and one more:
    FSDP2's backward prefetch unshards the next unit before the current one's backward runs
    (the root's, at the head and loss, the last block), which loads that unit's shards
    through the swapper until its own gather. Shards = ``lookahead`` + 1 largest blocks
    (measured at the loss's backward: the last two blocks resident, on 1 and 2 ranks).
    Bounce memory: a shard whose storage is not page-aligned (every torch CPU allocation)
    is read through a bounce block of its size from the swapper's own arena
    (``chunk_bytes`` = the largest unit, pages touched only as used, unmapped by ``trim``
    at the end of every step on an unpinned arena). Reads in flight are the ones read
    ahead (the gathered unit was read ahead, so it is a hit), so the arena's touched bytes
    are ``lookahead`` largest blocks.
  * forward/backward of the first step: the swapper is recording the cycle (no read-ahead):
    every unit is read on demand and evicted after its gather, so between gathers only the
    unit FSDP2 prefetched is resident (one largest block), but the arena's chunk has been
    touched by the largest unit's bounce.
    The optimizer state does not exist yet (torch's and memopt's optimizers create it in
    their first ``step``). This moment is the peak only when the state is small (or on a
    tier) and the root unit large; the larger of the two moments is taken.
  * optimizer step: unit k steps while unit k+1 is read ahead and unit k-1's write lands
    (it is released after unit k's step): three units' shards (the three largest bound it).
    The bounce arena holds k-1's write and k+1's read while unit k steps: two units (the two
    largest bound it). On a slow disk unit k's own read can still be in flight when k+1's
    starts (``prefetch(k+1)`` comes before ``load(k)``): a third unit, briefly, before
    unit k's step allocates anything; not counted.

  With a GPU the arena is pinned and never trimmed (re-pinning costs more), and a pinned
  chunk is resident whole: the first chunk is one largest unit, the step's two units in
  flight need a second one, so the pinned tier holds two largest units (at most all the
  shards).
- ``offload`` at stage 3 (``StateStore``): each unit's optimizer state (and fp32 master
  copy) lives on the tier (pinned host or disk) between steps; during the unit-by-unit step
  two units' state is in memory (the one stepping and the one read ahead; the writes in
  flight keep at most the stepping unit's tensors alive). With ``offload="cpu"`` the state's
  bytes are counted on the pinned tier and the two units in memory beside them.

Units: the repeated blocks and the root unit (every parameter outside them), each split over
W ranks; rounding of each shard storage up to 4096 bytes (the bounce granule) is ignored
(under one page per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from memopt.memory.masters import fsdp2
from memopt.memory.trace import find_blocks

__all__ = [
    "PARAM_LOOKAHEAD", "Stage3Placement", "UnitSizes", "find_units", "gathered_units",
    "place_stage3", "unit_sizes",
]  # fmt: skip

#: ``make_param_swapper``'s default read-ahead (units), which ``memopt.shard`` uses.
PARAM_LOOKAHEAD = 1
FWD, STEP = "forward/backward", "optimizer step"


class UnitSizes:
    """The FSDP units (the blocks and the root unit) as fractions of all parameters:
    ``top(n)``: the n largest units together; ``block``: the largest block (the largest unit
    when the model has no repeated blocks)."""

    def __init__(self, block_numels: list[int], total_numel: int) -> None:
        root = total_numel - sum(block_numels)
        total = max(1, total_numel)
        units = [*block_numels, root] if root > 0 else list(block_numels)
        self._sorted = sorted((u / total for u in units), reverse=True) or [1.0]
        self.block = max(block_numels) / total if block_numels else self._sorted[0]

    def top(self, n: int) -> float:
        return min(1.0, sum(self._sorted[:n]))

    @property
    def largest(self) -> float:
        return self._sorted[0]


def unit_sizes(module: nn.Module) -> UnitSizes:
    """The stage-3 units' shares of all parameters."""
    total = sum(p.numel() for p in module.parameters())
    return UnitSizes([sum(p.numel() for p in b.parameters()) for b in find_blocks(module)], total)


def find_units(module: nn.Module, cfg: Any, at_head: bool = False) -> int:
    """Bytes unsharded at once under stage 3: the root unit (every parameter outside the
    repeated blocks: embeddings, head, final norm; gathered for the whole step) plus two of
    the largest block (the one in use and the prefetched next). ``at_head``: a moment in the
    backward before any block's own (the head and the loss: ``ActivationTrace.peak_at_head``,
    a causal LM's usual peak). There no block is in use: FSDP2's root pre-backward has only
    issued the last block's prefetch, and on one rank its unshard allocates nothing until
    the unit is used: the root alone (measured: FSDP2's state at the loss's backward). Two
    blocks there over-counted: ``memopt report --vocab 2000 --stage 3 --offload-params cpu``
    read 1.045. On several ranks the prefetch's all-gather output (one whole block) exists
    at once, and the 2-rank runs hold 1-2 MiB more there than the trace and that block (not
    yet attributed; root + one block read 0.96-0.99): two blocks are kept as the bound."""
    size = cfg.param_dtype.itemsize
    total = sum(p.numel() for p in module.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in find_blocks(module)]
    if not blocks:
        return total * size
    held = 0 if at_head and cfg.world_size == 1 else 2
    return (total - sum(blocks) + held * max(blocks)) * size


def gathered_units(cfg: Any, module: nn.Module, shared: int, at_head: bool = False) -> int:
    """Stage 3's unsharded units at the forward/backward peak: ``shared`` (``shard_share``'s
    figure) on several ranks. On one rank FSDP2 runs only with ``offload_params``
    (``masters.fsdp2``), and its all-gather still copies each unit into unsharded parameters
    beside the one-rank "shards" (the plain one-rank path gathers nothing). Before, the
    estimate left them out there: ``memopt report`` read 0.91 (cpu) / 0.89 (nvme).
    ``shared`` is the figure away from the head (capped at all parameters); ``at_head``
    gives the one at the head (``find_units``)."""
    if fsdp2(cfg) and cfg.world_size == 1:
        return find_units(module, cfg, at_head)
    return min(shared, find_units(module, cfg, at_head))


@dataclass
class Stage3Placement:
    """Resident bytes per category at each moment (besides activations, gradients and
    temporaries), the gradient bytes on the device and the host-tier bounce arena."""

    forward: dict[str, int]
    step: dict[str, int]
    grads: int
    arena: dict[str, int] = field(default_factory=lambda: {FWD: 0, STEP: 0})


def place_stage3(
    cfg: Any,
    tiers: dict[str, dict[str, int]],
    base: dict[str, int],
    held: dict[str, int],
    grads: int,
    units: UnitSizes,
) -> Stage3Placement:
    """Move stage-3 bytes to their tiers (``tiers`` is updated in place; the arena is not:
    ``estimate`` adds the moment's share).

    ``base``: what stays resident on the device between steps (parameters, buffers);
    ``held``: optimizer state and master weights; ``grads``: this rank's gradient shards.
    """
    host = "pinned_host" if cfg.device_kind != "cpu" else "pageable_host"
    base, held = dict(base), dict(held)
    step_only = dict.fromkeys(held, 0)
    if cfg.offload is not None:  # the tier holds it all; two units' worth during the step
        where = "disk" if cfg.offload == "nvme" else "pinned_host"
        for k, v in held.items():
            tiers[where][k] += v
        step_only = {k: int(v * units.top(2)) for k, v in held.items()}
        held = dict.fromkeys(held, 0)
    if cfg.offload_params == "cpu" and cfg.device_kind != "cpu":  # shards, grads, step on host
        tiers[host]["parameters"] += base["parameters"]
        tiers[host]["gradients"] += grads
        for k, v in held.items():
            tiers[host][k] += v + step_only[k]
        base["parameters"], grads = 0, 0
        held, step_only = dict.fromkeys(held, 0), dict.fromkeys(held, 0)
    # (a CPU run with offload_params="cpu": the "device" is host RAM, nothing moves)
    step = {**base, **{k: v + step_only[k] for k, v in held.items()}}
    if cfg.offload_params != "nvme":
        return Stage3Placement({**base, **held}, step, grads)
    return _nvme_params(cfg, tiers, base, held, step, grads, units)


def _nvme_params(
    cfg: Any,
    tiers: dict[str, dict[str, int]],
    base: dict[str, int],
    held: dict[str, int],
    step: dict[str, int],
    grads: int,
    units: UnitSizes,
) -> Stage3Placement:
    """``offload_params="nvme"``: the two forward/backward moments and the step (see the
    module docstring)."""
    shards = base["parameters"]
    tiers["disk"]["parameters"] += shards
    ahead = int(shards * min(1.0, PARAM_LOOKAHEAD * units.block))
    held_ahead = int(shards * min(1.0, (PARAM_LOOKAHEAD + 1) * units.block))  # + FSDP2's
    steady = {**base, **held, "parameters": held_ahead}
    first = {**steady, "parameters": int(shards * units.block), "optimizer_state": 0}
    first_arena = int(shards * units.largest)
    step["parameters"] = int(shards * units.top(3))
    arena = {FWD: ahead, STEP: int(shards * units.top(2))}
    if cfg.device_kind != "cpu":  # pinned whole, never trimmed: two chunks of a largest unit
        arena = dict.fromkeys(arena, min(shards, 2 * first_arena))
        return Stage3Placement(steady, step, grads, arena)
    if sum(first.values()) + first_arena > sum(steady.values()) + ahead:
        return Stage3Placement(first, step, grads, {FWD: first_arena, STEP: arena[STEP]})
    return Stage3Placement(steady, step, grads, arena)
