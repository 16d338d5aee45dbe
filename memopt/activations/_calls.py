"""Per-call figures of a profiled step: a block may run several times per forward.

Weight-shared stacks (ALBERT's layer group) and loops over rounds of the same blocks call a
block ``R`` times in one forward. Each call is managed on its own at run time: a recompute
checkpoints each call (keeping that call's arguments), a swap moves each call's saves out and
brings them back when that call's backward starts, with the call before it prefetched. So
the planner prices such a step call by call (``_loops``), from one ``CallProfile`` per
grad-enabled block call in forward order.

Bytes are counted as the managers' ledger (keyed by block) counts them: a storage that
several calls of one block save, or pass as an argument, is counted at the first of them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from memopt.activations._probe import Record

__all__ = ["CallProfile", "call_profiles", "repeated_blocks"]


@dataclass(frozen=True)
class CallProfile:
    """One forward call of one block: what it saves and what a checkpoint of it keeps."""

    block: str
    saved_bytes: int  # storages first saved (for its block) by this call
    input_bytes: int  # its first tensor argument
    input_saved: bool  # the call saved its own input
    args_bytes: int  # tensor arguments no earlier call of the block passed (rotary tables once)
    small_saved_bytes: int  # of saved_bytes, storages below min_swap_bytes (a swap keeps them)


def call_profiles(rec: Record, min_swap_bytes: int) -> tuple[CallProfile, ...]:
    """The calls of ``rec`` in forward order."""
    out = []
    for name, keys, (in_bytes, in_key), args in zip(
            rec.calls, rec.call_keys, rec.call_in, rec.call_args, strict=True):
        saved = sum(rec.sizes[k] for k in keys)
        small = sum(rec.sizes[k] for k in keys if rec.sizes[k] < max(min_swap_bytes, 1))
        out.append(CallProfile(name, saved, in_bytes, in_key in keys, max(args, 0), small))
    return tuple(out)


def repeated_blocks(calls: tuple[CallProfile, ...]) -> dict[str, int]:
    """Blocks that ran more than once in the profiled forward, with their call counts."""
    return {name: n for name, n in Counter(c.block for c in calls).items() if n > 1}
