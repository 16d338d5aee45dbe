"""Planning a step whose blocks run several times per forward, priced call by call.

The block-by-block dynamic programme of ``_solve`` assumes each block runs once: block ``k``'s
backward meets the held bytes of blocks ``0..k``. When a block runs ``R`` times (a
weight-shared layer group, a loop over rounds of the same blocks) the backward runs over the
*calls* in reverse forward order, and each call is managed on its own (``_calls``): its
checkpoint keeps its own arguments, its swap brings back its own saves, and the call before
it is prefetched. So every call is an event of its own:

    call c's backward:   base + sum_{c' <= c} held(c') + transient(c) + prefetch(c - 1)
    after the forward:   base + head + sum_c held(c) + unreaped(last call)

with the figures of each call from ``costmodel.option_for`` on that call's bytes (a
recompute re-materialises one call at a time: its transient is that call's, not the sum of
all calls'). The policy is per block, shared by its calls, which the DP's state cannot
express; the plans are enumerated instead (cheapest first, the first that fits wins), up to
``MAX_PLANS`` combinations. Token split and sampling are not offered for a block that runs
more than once (their per-call figures are not measured).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from memopt.activations import _solve
from memopt.activations._calls import CallProfile, repeated_blocks
from memopt.activations.costmodel import Option, Window, option_for
from memopt.activations.policy import ActivationPolicy
from memopt.activations.profile import BlockProfile, Profile

__all__ = ["MAX_PLANS", "LoopChoice", "block_option", "call_option", "solve"]

MAX_PLANS = 50_000


def call_option(policy: ActivationPolicy, b: BlockProfile, call: CallProfile, prof: Profile,
                win: Window) -> Option:
    """``policy``'s figures for one call of block ``b``."""
    if policy.action in ("split", "sample"):
        raise ValueError(
            f"block {b.name} runs {sum(c.block == b.name for c in prof.calls)} times per "
            f"forward: the planner cannot price {policy.action!r} on it; pin it to keep, "
            "recompute or swap")
    share = call.saved_bytes / b.saved_bytes if b.saved_bytes else 0.0
    one = replace(b, saved_bytes=call.saved_bytes, input_bytes=call.input_bytes,
                  input_saved=call.input_saved, args_bytes=call.args_bytes,
                  small_saved_bytes=call.small_saved_bytes,
                  kept_out_bytes=round(b.kept_out_bytes * share),
                  kept_saved_bytes=round(b.kept_saved_bytes * share))
    return option_for(policy, one, prof, win)


def block_option(policy: ActivationPolicy, per_call: Sequence[Option]) -> Option:
    """One block's figures over its calls: held summed, the largest transient of one call."""
    if not per_call:
        return Option(policy, 0, 0, 0, 0.0)
    return Option(policy, sum(o.held for o in per_call), max(o.transient for o in per_call),
                  max(o.prefetch for o in per_call), sum(o.overhead_s for o in per_call),
                  seen_transient=max(o.ledger_transient for o in per_call),
                  unreaped=max(o.unreaped for o in per_call),
                  unreaped_at_fetch=max(o.unreaped_at_fetch for o in per_call))


@dataclass(frozen=True)
class LoopChoice:
    picks: list[int]  # option index per block
    blocks: list[Option]  # the block-level figures of the picks
    peak: int
    ledger_peak: int


def _tables(prof: Profile, policies: Sequence[Sequence[ActivationPolicy]],
            wins: Sequence[Window]) -> list[list[list[Option]]]:
    """Per block, per policy: the options of its calls in forward order."""
    return [[[call_option(p, b, c, prof, win) for c in prof.calls if c.block == b.name]
             for p in pols]
            for b, pols, win in zip(prof.blocks, policies, wins, strict=True)]


def _sequence(prof: Profile, tables: list[list[list[Option]]], picks: Sequence[int]) -> list[
        Option]:
    index = {b.name: k for k, b in enumerate(prof.blocks)}
    cursor = [0] * len(prof.blocks)
    seq = []
    for c in prof.calls:
        k = index[c.block]
        seq.append(tables[k][picks[k]][cursor[k]])
        cursor[k] += 1
    return seq


def solve(prof: Profile, policies: Sequence[Sequence[ActivationPolicy]], wins: Sequence[Window],
          base: int, budget: int) -> tuple[LoopChoice | None, LoopChoice]:
    """(the cheapest plan within ``budget`` or None, the plan of the smallest peak)."""
    sizes = [len(p) for p in policies]
    total = 1
    for n in sizes:
        total *= n
    if total > MAX_PLANS:
        reps = repeated_blocks(prof.calls)
        raise ValueError(
            f"blocks {sorted(reps)} run {sorted(set(reps.values()))} times per forward; the "
            f"planner prices such a step call by call over every combination of policies, "
            f"and {total} combinations exceed {MAX_PLANS}: pass fewer actions= or pin blocks "
            "with overrides=")
    tables = _tables(prof, policies, wins)
    prob = _solve.Problem((), base, prof.head_saved_bytes, 1)
    blocks = [[block_option(p, calls) for p, calls in zip(pols, tab, strict=True)]
              for pols, tab in zip(policies, tables, strict=True)]

    def cost(picks: tuple[int, ...]) -> float:
        return sum(o[i].overhead_s + (0.0 if o[i].policy.action == "keep" else _solve.TIE_S)
                   for o, i in zip(blocks, picks, strict=True))

    def choice(picks: Sequence[int]) -> LoopChoice:
        seq = _sequence(prof, tables, picks)
        return LoopChoice(list(picks), [o[i] for o, i in zip(blocks, picks, strict=True)],
                          _solve.peak_of(prob, seq), _solve.peak_of(prob, seq, ledger=True))

    combos = sorted(itertools.product(*(range(n) for n in sizes)), key=cost)
    best: LoopChoice | None = None
    lowest: LoopChoice | None = None
    for picks in combos:
        c = choice(picks)
        if c.peak <= budget:
            best = c
            break
        if lowest is None or c.peak < lowest.peak:
            lowest = c
    if best is not None:
        return best, best
    assert lowest is not None, "every block has at least one option"
    return None, lowest
