"""Stage 3 on several ranks: every rank must run the same FSDP2 units, in the same order.

Each unit's forward all-gathers that unit's shards, and the backward reduce-scatters its
gradients. A rank that runs another unit (a multi-task model whose rank 0 calls ``heads[0]``
while rank 1 calls ``heads[1]``, root-level experts chosen per batch) pairs its collectives
with the wrong ones: with units of one byte size both ranks silently compute with half of
each other's rows and every parameter ends wrong; with different sizes gloo aborts and NCCL
hangs or mixes bytes. FSDP2 does not check it, so ``UnitCalls`` does:

- a forward pre-hook on each unit (run before FSDP2's, which issues the all-gather) counts
  its forwards on this rank;
- at the start of each backward (the first unit ``pre_backward`` of that autograd graph
  task, before FSDP2 gathers anything for it) one all-reduce of the counts since the last
  check (sum and sum of squares per unit: equal counts on every rank iff
  ``W * sum(c^2) == sum(c)^2``) raises on every rank from ``backward()``, before any
  reduce-scatter and before ``step()`` could apply mixed gradients;
- until that first check has passed, and always under ``MEMOPT_DEBUG_COLLECTIVES=1``, each
  unit's forward also all-reduces which unit every rank is about to gather (one small
  all-reduce per unit forward), so a divergence raises before the mismatched all-gather,
  naming each rank's unit.

Both raise ``UnitMismatchError`` (a ``RuntimeError``) naming the units and what to do: keep
modules that only some ranks run inside a unit every rank runs (one unit for the whole list,
or the root: ``FSDPOptions(modules=...)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["UnitCalls", "UnitMismatchError"]

_FIX = (
    "Every rank must run the same FSDP2 units (each forward all-gathers its unit). Keep "
    "modules that only some ranks run (task heads, experts chosen per batch) inside a unit "
    "every rank runs: pass FSDPOptions(modules=[...]) without them, so they join the root, "
    "or list their parent (e.g. the whole ModuleList) as one unit; the default units are "
    "memopt.sharding.fsdp.default_units(model)"
)


class UnitMismatchError(RuntimeError):
    """Ranks ran different stage-3 units (raised on every rank)."""


class UnitCalls:
    """Counts each unit's forwards and checks them across ranks (see the module docstring).
    ``units``: ``(name, module)`` per FSDP2 unit, in the same order on every rank."""

    def __init__(
        self, units: list[tuple[str, nn.Module]], groups: list[Any], comm: Any, always: bool
    ) -> None:
        self.names = [n for n, _ in units]
        self.comm = comm
        self.always = always  # check before every unit forward (debug mode)
        self.early = True  # ... and until the first backward's check passed
        self.counts = torch.zeros(len(units))
        self.task = -1  # the autograd graph task whose counts were checked last
        self.handles = [
            module.register_forward_pre_hook(self._hook(i), prepend=True)
            for i, (_, module) in enumerate(units)
        ]
        for group in groups:
            self._wrap(group)

    def _wrap(self, group: Any) -> None:
        pre_backward = group.pre_backward

        def hook(*args: Any, **kwargs: Any) -> Any:
            task = torch._C._current_graph_task_id()
            if task != self.task:  # the first unit of this backward
                self.task = task
                self.check_counts()
            return pre_backward(*args, **kwargs)

        group.pre_backward = hook

    def _hook(self, index: int) -> Any:
        def pre_forward(_module: nn.Module, _args: Any) -> None:
            if self.always or self.early:
                self._check_now(index)
            self.counts[index] += 1

        return pre_forward

    def _check_now(self, index: int) -> None:
        """All-reduce which unit each rank is about to gather; raise unless all the same."""
        slots = torch.zeros(self.comm.world, device=self.comm.device())
        slots[self.comm.rank] = index + 1
        got = [int(v) - 1 for v in self.comm.all_reduce_sum(slots, what="stage-3 unit check")]
        if len(set(got)) > 1:
            each = ", ".join(f"rank {r}: {self._name(i)!r}" for r, i in enumerate(got))
            raise UnitMismatchError(
                f"memopt.shard(stage=3): the ranks are about to run different FSDP2 units "
                f"({each}); their all-gathers would pair up and mix the units' parameters. " + _FIX
            )

    def _name(self, index: int) -> str:
        return self.names[index] if 0 <= index < len(self.names) else "?"

    def check_counts(self) -> None:
        """All-reduce this rank's counts since the last check (as ``[c, c^2]``, then reset);
        raise on every rank if they differ between ranks."""
        c, self.counts = self.counts, torch.zeros_like(self.counts)
        summed = self.comm.all_reduce_sum(
            torch.cat([c, c * c]).to(self.comm.device()), what="stage-3 unit forward counts"
        ).cpu()
        n = len(self.names)
        total, squares = summed[:n].double(), summed[n:].double()
        bad = (squares * self.comm.world != total * total).nonzero().flatten().tolist()
        if not bad:
            self.early = False
            return
        each = ", ".join(f"{self.names[i]!r} ({int(total[i])} calls in all)" for i in bad[:6])
        raise UnitMismatchError(
            f"memopt.shard(stage=3): the ranks ran different FSDP2 units in the forwards "
            f"since the last backward: {each} ran a different number of times on different "
            f"ranks, so their all-gathers paired with other units' (those forwards computed "
            f"with mixed parameters; this backward stopped before reducing any gradient and "
            f"the parameters are unchanged, but FSDP2's state is not: fix the units and "
            f"start again, e.g. from the last checkpoint). " + _FIX
        )


def unit_modules(model: nn.Module, groups: list[Any]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each FSDP2 unit, in ``groups``' order (the module each unit's
    ``fully_shard`` was applied to)."""
    names = {id(m): n or "the root" for n, m in model.named_modules()}
    out = []
    for g in groups:
        module = g.modules[0] if hasattr(g, "modules") else g.module
        out.append((names.get(id(module), type(module).__name__), module))
    return out
