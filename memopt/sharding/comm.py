"""``Comm``: the few collectives the sharding layer issues, in one place.

Every collective goes through this class, so that a later debug mode can fingerprint each call
(op, size, sequence number) before issuing it, and so that world size 1 needs no process group
at all: there every collective is the identity and returns a finished handle. Ranks passed in
and out are ranks *within the group* (``group_dst`` / ``group_src``), never global ranks.

Reductions use SUM followed by an explicit divide by the caller (pytorch#162338 reported AVG
wrong under gloo; SUM is exact on every backend). All tensors must be contiguous.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the flat collectives (the old names warn); older torch has only those.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Done:
    """A finished work handle (world size 1, or a collective with nothing to do)."""

    def wait(self) -> bool:
        return True


DONE = _Done()


class Comm:
    """A process group (or none, at world size 1) with async collectives."""

    def __init__(self, group: Any, rank: int, world: int) -> None:
        self.group = group
        self.rank = rank
        self.world = world

    @classmethod
    def resolve(cls, process_group: Any) -> Comm:
        """Check the group before any collective; see ``memopt.shard`` for the rules."""
        initialized = dist.is_available() and dist.is_initialized()
        if process_group is not None and not initialized:
            raise ValueError(
                "memopt.shard: a process_group was given but torch.distributed is not "
                "initialized; call torch.distributed.init_process_group first (torchrun sets "
                "the environment for it)"
            )
        if not initialized:
            return cls(None, 0, 1)
        group = process_group if process_group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(
                f"memopt.shard: this process (global rank {dist.get_rank()}) is not a member of "
                "the process_group given; pass a group that contains every rank calling "
                "memopt.shard (or None for the default group)"
            )
        return cls(group, rank, dist.get_world_size(group))

    def backend(self) -> str | None:
        return None if self.group is None else str(dist.get_backend(self.group))

    # -- collectives (async; the caller waits) --------------------------------------
    def reduce_scatter(self, out: Tensor, inp: Tensor) -> Any:
        if self.world == 1:
            out.copy_(inp)
            return DONE
        return _REDUCE_SCATTER(out, inp, group=self.group, async_op=True)

    def all_gather(self, out: Tensor, inp: Tensor) -> Any:
        if self.world == 1:
            out.copy_(inp)
            return DONE
        return _ALL_GATHER(out, inp, group=self.group, async_op=True)

    def reduce(self, t: Tensor, dst: int) -> Any:
        if self.world == 1:
            return DONE
        return dist.reduce(t, group_dst=dst, group=self.group, async_op=True)

    def broadcast(self, t: Tensor, src: int) -> Any:
        if self.world == 1:
            return DONE
        return dist.broadcast(t, group_src=src, group=self.group, async_op=True)

    def gather(self, t: Tensor, dst: int) -> list[Tensor] | None:
        """Blocking gather of equal-shape tensors to ``dst``; the list on ``dst``, else None."""
        if self.world == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(t, out, group_dst=dst, group=self.group)
        return out

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Blocking in-place SUM."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t
