"""Exact block-by-block dynamic programme behind the planner (see ``planner`` for the model).

Blocks are visited in forward order. A state after block ``k`` is ``(o_k, b)``: the option
chosen for block ``k`` and ``b``, the bytes held from the forward to the backward by blocks
``0..k`` in units of a quantum ``q`` (each option's held bytes rounded *up*, so a state never
under-counts). The option of the previous block matters because its prefetch lands while
block ``k`` runs its backward. The peak events of a plan are

    block k's backward:   base + P_k + T_k + prefetch_{k-1}   (+ U'_n for the last block)
    after the forward:    base + head + P_n + U_n

(``P_k``: held bytes of blocks 0..k; ``T_k``: block k's transient bytes; ``base``: non-block
bytes alive throughout; ``head``: bytes of the head/loss, freed before any block's backward:
the last block's gradient hook fires after the head's backward released its saves, so the
last block's fetch-back never meets them; ``U_n``/``U'_n``: the last block's copy-out sources
still on the device then, ``Option.unreaped``/``unreaped_at_fetch``, 0 for synchronous
copies). Adding the last block's fetch-back (``prefetch_n``) to the head instead made a CPU
plan ending in a split or a swap read up to 1.6x its measured peak.

Two passes over the same states, vectorised along ``b`` with numpy (``O(n * m^2 * nb)`` for
``n`` blocks, ``m`` options per block, ``nb`` quanta):

- ``min_peak``: the value of a state is the smallest running peak of any path to it; the
  answer is the minimum reachable budget.
- ``min_cost``: under a budget, a transition is allowed only if its peak event fits; the value
  is the smallest total overhead; back-pointers give the plan. With ``q`` fixed per profile,
  a larger budget only adds allowed transitions, so the optimum never gets slower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memopt.activations.costmodel import Option

__all__ = ["Problem", "min_cost", "min_peak", "peak_of"]

# Added to every non-keep option's cost in ``min_cost``: between plans of equal predicted time
# (a swap fully hidden on CUDA costs 0 s) the one that changes fewer blocks wins.
TIE_S = 1e-9


@dataclass(frozen=True)
class Problem:
    options: Sequence[Sequence[Option]]
    base: int
    head: int
    quantum: int

    def bins(self) -> int:
        most = sum(max(o.held for o in opts) for opts in self.options)
        return math.ceil(most / self.quantum) + len(self.options) + 2

    def held_q(self, k: int) -> list[int]:
        return [math.ceil(o.held / self.quantum) for o in self.options[k]]


def peak_of(prob: Problem, chosen: Sequence[Option], *, ledger: bool = False) -> int:
    """Exact (unrounded) peak saved bytes of one choice per block; with ``ledger``, the peak
    a ``SavedLedger`` sees (recompute transients are out of its sight)."""
    held = prev_pf = 0
    peak = 0
    for k, opt in enumerate(chosen):
        held += opt.held
        transient = opt.ledger_transient if ledger else opt.transient
        stale = opt.unreaped_at_fetch if k == len(chosen) - 1 else 0
        peak = max(peak, prob.base + held + transient + prev_pf + stale)
        prev_pf = opt.prefetch
    last = chosen[-1].unreaped if chosen else 0
    return max(peak, prob.base + prob.head + held + last)


def _step(prob: Problem, k: int, value: list[np.ndarray], budget: float | None) -> tuple[
        list[np.ndarray], list[np.ndarray]]:
    """One block: new values per option and the previous option chosen per bin."""
    nb = value[0].shape[0]
    bins = np.arange(nb, dtype=np.float64) * prob.quantum + prob.base
    prev_pf = [o.prefetch for o in prob.options[k - 1]] if k else [0]
    last = k == len(prob.options) - 1
    new_vals, backs = [], []
    for h, opt in zip(prob.held_q(k), prob.options[k], strict=True):
        best = np.full(nb, np.inf)
        back = np.zeros(nb, dtype=np.int16)
        stale = opt.unreaped_at_fetch if last else 0
        for p, src in enumerate(value):
            event = bins[h:] + opt.transient + prev_pf[p] + stale
            cand = np.full(nb, np.inf)
            if budget is None:
                cand[h:] = np.maximum(src[: nb - h], event)
            else:
                cost = opt.overhead_s + (0.0 if opt.policy.action == "keep" else TIE_S)
                cand[h:] = np.where(event <= budget, src[: nb - h] + cost, np.inf)
            better = cand < best
            best[better], back[better] = cand[better], p
        new_vals.append(best)
        backs.append(back)
    return new_vals, backs


def _final(prob: Problem, value: list[np.ndarray], budget: float | None) -> list[np.ndarray]:
    nb = value[0].shape[0]
    bins = np.arange(nb, dtype=np.float64) * prob.quantum + prob.base + prob.head
    out = []
    for v, opt in zip(value, prob.options[-1], strict=True):
        event = bins + opt.unreaped  # (its fetch-back comes after the head is freed)
        out.append(np.maximum(v, event) if budget is None
                   else np.where(event <= budget, v, np.inf))
    return out


def _run(prob: Problem, budget: float | None) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    nb = prob.bins()
    start = np.full(nb, np.inf)
    start[0] = 0.0
    value, backs = [start], []
    for k in range(len(prob.options)):
        value, back = _step(prob, k, value, budget)
        backs.append(back)
    return _final(prob, value, budget), backs


def _trace(prob: Problem, backs: list[list[np.ndarray]], o: int, b: int) -> list[int]:
    picks = []
    for k in range(len(prob.options) - 1, -1, -1):
        picks.append(o)
        p = int(backs[k][o][b])
        b -= prob.held_q(k)[o]
        o = p
    return picks[::-1]


def _best(final: list[np.ndarray]) -> tuple[int, int] | None:
    """(option, bin) of the smallest value; ties go to the fewest held bytes."""
    stacked = np.stack(final)
    low = stacked.min()
    if not np.isfinite(low):
        return None
    ok = stacked <= low + 1e-12
    bins = np.where(ok.any(axis=0))[0]
    b = int(bins[0])
    return int(np.where(ok[:, b])[0][0]), b


def min_peak(prob: Problem) -> tuple[int, list[int]]:
    """Smallest reachable peak (rounded-up model) and the choice reaching it."""
    final, backs = _run(prob, None)
    where = _best(final)
    assert where is not None, "every block has at least one option"
    return int(final[where[0]][where[1]]), _trace(prob, backs, *where)


def min_cost(prob: Problem, budget: int) -> list[int] | None:
    """Option indices of the cheapest plan whose every peak event fits ``budget``."""
    final, backs = _run(prob, float(budget))
    where = _best(final)
    return None if where is None else _trace(prob, backs, *where)
