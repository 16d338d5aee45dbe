"""``Comm``: the few collectives the sharding layer issues, in one place.

Every collective goes through this class, so that world size 1 needs no process group at all
(there every collective is the identity and returns a finished handle) and so that one debug
mode sees every call. Ranks passed in and out are ranks *within the group* (``group_dst`` /
``group_src``), never global ranks.

Reductions use SUM followed by an explicit divide by the caller (pytorch#162338 reported AVG
wrong under gloo; SUM is exact on every backend). All tensors must be contiguous.

Debug mode (``MEMOPT_DEBUG_COLLECTIVES=1``, read when a ``Comm`` is built): before each
collective every rank all-gathers a fixed-size int64 fingerprint (sequence number, op, input
and output sizes, dtype, root rank) and compares the rows. The fingerprint exchange is itself
the n-th collective on every rank, so it pairs up even when the real calls do not; when the
rows differ, the ranks swap one-line descriptions of their call (op, sizes, and the caller's
label: which bucket and parameters, which projector) with ``all_gather_object`` and every rank
raises ``CollectiveMismatchError`` naming each rank's call, instead of hanging in (or silently
corrupting) the mismatched collective. A rank whose peers never reach a matching exchange
(they issued fewer collectives) raises after ``MEMOPT_DEBUG_COLLECTIVES_TIMEOUT`` seconds
(default 120). Cost: one small blocking all-gather per collective, so it is for debugging only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from memopt._utils.process_group import as_process_group

# torch 2.13 renamed the flat collectives (the old names warn); older torch has only those.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

WORLD1_ENV = "MEMOPT_SHARD_WORLD1_COLLECTIVES"
DEBUG_ENV = "MEMOPT_DEBUG_COLLECTIVES"
DEBUG_TIMEOUT_ENV = "MEMOPT_DEBUG_COLLECTIVES_TIMEOUT"
_OPS = ("reduce_scatter", "all_gather", "reduce", "broadcast", "gather", "all_reduce_sum")
_FIELDS = ("sequence number", "op", "input numel", "output numel", "dtype", "root rank")
#: A label: a string, or a function building one (called only in debug mode).
What = str | Callable[[], str] | None


class CollectiveMismatchError(RuntimeError):
    """Ranks issued different collectives (raised on every rank in debug mode)."""


def world1_collectives() -> bool:
    """Whether ``MEMOPT_SHARD_WORLD1_COLLECTIVES`` asks for the sharded path on one rank
    (buckets, hooks, collectives, FSDP2) instead of the plain one: a way to run a backend such
    as NCCL through memopt's code on a single GPU. Results equal the plain path's."""
    raw = os.environ.get(WORLD1_ENV, "").strip().lower()
    return raw not in ("", "0", "false", "no", "off")


def debug_enabled() -> bool:
    """Whether ``MEMOPT_DEBUG_COLLECTIVES`` asks for the collective check."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class _Done:
    """A finished work handle (world size 1, or a collective with nothing to do)."""

    def wait(self) -> bool:
        return True


DONE = _Done()


class Comm:
    """A process group (or none, at world size 1) with async collectives."""

    def __init__(self, group: Any, rank: int, world: int, debug: bool | None = None) -> None:
        self.group = group
        self.rank = rank
        self.world = world
        self.debug = debug_enabled() if debug is None else debug
        self.seq = 0  # collectives issued through this Comm (counted in debug mode)

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
        group = as_process_group(process_group, "memopt.shard")
        group = dist.group.WORLD if group is None else group
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
    def device(self) -> torch.device:
        """The device this group's collectives use by default: the current accelerator under
        NCCL, else the CPU (for flags and other small tensors that belong to no parameter)."""
        if self.backend() == "nccl":
            acc = torch.accelerator.current_accelerator()
            if acc is not None:
                return torch.device(acc.type, torch.accelerator.current_device_index())
        return torch.device("cpu")

    def reduce_scatter(self, out: Tensor, inp: Tensor, *, what: What = None) -> Any:
        if self.world == 1:
            out.copy_(inp)
            return DONE
        self._check("reduce_scatter", inp, out.numel(), -1, what)
        return _REDUCE_SCATTER(out, inp, group=self.group, async_op=True)

    def all_gather(self, out: Tensor, inp: Tensor, *, what: What = None) -> Any:
        if self.world == 1:
            out.copy_(inp)
            return DONE
        self._check("all_gather", inp, out.numel(), -1, what)
        return _ALL_GATHER(out, inp, group=self.group, async_op=True)

    def reduce(self, t: Tensor, dst: int, *, what: What = None) -> Any:
        if self.world == 1:
            return DONE
        self._check("reduce", t, t.numel(), dst, what)
        return dist.reduce(t, group_dst=dst, group=self.group, async_op=True)

    def broadcast(self, t: Tensor, src: int, *, what: What = None) -> Any:
        if self.world == 1:
            return DONE
        self._check("broadcast", t, t.numel(), src, what)
        return dist.broadcast(t, group_src=src, group=self.group, async_op=True)

    def gather(self, t: Tensor, dst: int, *, what: What = None) -> list[Tensor] | None:
        """Blocking gather of equal-shape tensors to ``dst``; the list on ``dst``, else None."""
        if self.world == 1:
            return [t]
        self._check("gather", t, t.numel() * self.world, dst, what)
        out = [torch.empty_like(t) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(t, out, group_dst=dst, group=self.group)
        return out

    def all_reduce_sum(self, t: Tensor, *, what: What = None) -> Tensor:
        """Blocking in-place SUM."""
        if self.world > 1:
            self._check("all_reduce_sum", t, t.numel(), -1, what)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def flagged_ranks(
        self, flag: bool, *, device: torch.device | None = None, what: What = None
    ) -> list[int]:
        """The ranks that passed ``flag=True`` (blocking; one all-reduce of a flag per rank):
        how ranks agree to fail together instead of some of them waiting in a collective."""
        flags = torch.zeros(self.world, device=device or self.device())
        if flag:
            flags[self.rank] = 1.0
        self.all_reduce_sum(flags, what=what)
        return [r for r in range(self.world) if flags[r] > 0]

    # -- debug mode ------------------------------------------------------------------
    def _check(self, op: str, t: Tensor, out_numel: int, root: int, what: What) -> None:
        """Debug mode: raise on every rank if the ranks are not all issuing this collective."""
        if not self.debug:
            return
        self.seq += 1
        mine = [self.seq, _OPS.index(op), t.numel(), out_numel, _dtype_code(t.dtype), root]
        fp = torch.tensor(mine, dtype=torch.int64, device=t.device)
        rows_t = torch.empty(self.world * len(mine), dtype=torch.int64, device=t.device)
        desc = self._describe(op, t, out_numel, root, what)
        work = _ALL_GATHER(rows_t, fp, group=self.group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=_debug_timeout()))
        except RuntimeError as exc:
            raise CollectiveMismatchError(
                f"{DEBUG_ENV}: rank {self.rank} issued {desc}, and not every other rank issued "
                f"a collective #{self.seq} through memopt.sharding within {_debug_timeout():g} s "
                f"({DEBUG_TIMEOUT_ENV}): some rank issued fewer collectives (it finished, or "
                f"waits in a collective outside memopt). Backend error: {exc}"
            ) from exc
        rows = rows_t.view(self.world, len(mine)).tolist()
        if all(r == rows[0] for r in rows):
            return
        descs: list[Any] = [None] * self.world
        dist.all_gather_object(descs, desc, group=self.group)  # every rank is here: safe
        differ = [f for i, f in enumerate(_FIELDS) if len({r[i] for r in rows}) > 1]
        lines = [f"  rank {r}: {d}" for r, d in enumerate(descs)]
        raise CollectiveMismatchError(
            f"{DEBUG_ENV}: the ranks issued different collectives (they differ in "
            f"{', '.join(differ)}); without the check they would hang or exchange the wrong "
            "data:\n" + "\n".join(lines) + "\nEvery rank must issue the same collectives in the "
            "same order: the same parameters (shapes, dtypes, order) and the same sharding "
            "options on every rank."
        )

    def _describe(self, op: str, t: Tensor, out_numel: int, root: int, what: What) -> str:
        label = what() if callable(what) else what
        dtype = str(t.dtype).removeprefix("torch.")
        text = f"collective #{self.seq}: {op} of {t.numel()} x {dtype}"
        if out_numel != t.numel():
            text += f" (output {out_numel})"
        if root >= 0:
            text += f", root rank {root}"
        return text + (f" for {label}" if label else "")


def _dtype_code(dtype: torch.dtype) -> int:
    # The same on every rank (Python's str hash is salted per process): a weighted char sum.
    return sum((i + 1) * ord(c) for i, c in enumerate(str(dtype)))


def _debug_timeout() -> float:
    raw = os.environ.get(DEBUG_TIMEOUT_ENV, "120")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):  # (-5 made every rank report a mismatch)
        raise ValueError(f"{DEBUG_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value
