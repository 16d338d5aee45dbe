"""The planner: one policy per block that minimises predicted step time under a byte budget.

``plan(model, batch, budget)`` profiles one step (``profile.profile``), turns every allowed
policy of every block into an ``Option`` (``costmodel``: held bytes from the forward to the
backward, transient bytes during the block's own backward, bytes prefetched back during the
next block's backward, and extra seconds), and solves exactly (``_solve``):

    minimise   sum_k overhead(o_k)
    subject to base + P_k + T_k + prefetch_{k-1} <= budget   for every block k (its backward)
               base + head + P_n + U_n <= budget             (end of the forward)

where ``P_k`` sums the held bytes of blocks ``0..k`` (backward runs from the last block, so
when block ``k``'s backward runs, blocks ``> k`` have been freed). The last block's
fetch-back is not added to the head: its backward starts after the head's backward freed the
head's saves. ``U_n``: the last block's copy-out sources still on the device (asynchronous
copies only; ``costmodel``), also added to its own backward on CUDA. The solver is a dynamic
programme over blocks whose state is (previous block's option, held bytes on a grid of
``unmanaged peak / 4096`` bytes, rounded up): exact for the rounded model, and with the grid
fixed per profile a larger budget can only predict an equal or faster step.

Budgets: bytes (``int``), a size string (``"6GiB"``, ``"512MiB"``, ``"1.5GB"``) or a share of
the unmanaged peak (``"50%"``). A budget below every plan's peak is a ``ValueError`` naming the
minimum reachable budget. ``sample`` changes the gradient (an unbiased estimate), so it is only
considered when named in ``actions``. ``overrides`` pins blocks to a policy; an unknown block
name is an error (an override is used as given, selective or not). ``selective=False`` leaves
selective recompute (``keep_ops``) out of every block's choices: a selectively recomputed block
can be backwarded only once. ``compare(plan, ledger)`` reports predicted against measured
peak after a step under the applied plan (``BudgetPlan.ledger_peak_bytes``: the part of the
peak a ledger can see; a recompute's re-materialised activations are physical but out of its
sight).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from memopt.activations import _loops, _solve
from memopt.activations._calls import repeated_blocks
from memopt.activations.blocks import BlockSpec
from memopt.activations.costmodel import Option, block_options, option_for, windows
from memopt.activations.ledger import SavedLedger
from memopt.activations.policy import ACTIONS, Action, ActivationPolicy, BlockDecision, Plan, Tier
from memopt.activations.profile import LossFn, Profile, profile

__all__ = ["DEFAULT_ACTIONS", "BudgetPlan", "compare", "parse_budget", "plan", "plan_from_profile"]

DEFAULT_ACTIONS: tuple[Action, ...] = ("keep", "recompute", "swap", "split")
GRID = 4096
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class BudgetPlan(Plan):
    """A ``Plan`` from the planner, with the peak a ``SavedLedger`` can see.

    ``predicted_peak_bytes`` is physical: it includes what a recompute re-materialises during
    its backward. That happens inside ``torch.utils.checkpoint``'s own saved-tensor hooks, out
    of the ledger's sight, so ``ledger_peak_bytes`` (<= the physical peak) is what to compare
    with ``ledger.peak("device")``.
    """

    ledger_peak_bytes: int = 0


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def parse_budget(budget: int | float | str, unmanaged_peak: int) -> int:
    """Bytes of ``budget``: an int, ``"6GiB"``-style string, or ``"50%"`` of ``unmanaged_peak``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"budget={budget!r}: pass bytes (int), a size such as '6GiB', or '50%'")
    if isinstance(budget, float):  # 1.5e9 bytes, as the config's sizes take
        if not math.isfinite(budget):
            raise ValueError(f"budget={budget!r} is not a size")
        value = int(budget)
    elif isinstance(budget, int):
        value = budget
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*", budget)
        unit = m.group(2).lower() if m else ""
        if m is None or (unit not in _UNITS and unit != "%"):
            raise ValueError(f"budget={budget!r} is not a size; use e.g. '6GiB', '512MB', '50%'")
        number = float(m.group(1))
        value = int(number / 100 * unmanaged_peak) if unit == "%" else int(number * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"budget={budget!r} gives {value} bytes; it must be positive")
    return value


def _check_actions(actions: Sequence[str]) -> tuple[Action, ...]:
    if isinstance(actions, str):
        raise TypeError(f"actions is a tuple of action names, e.g. ({actions!r},), got the "
                        f"string {actions!r}")  # fmt: skip
    bad = [a for a in actions if a not in ACTIONS]
    if bad or not actions:
        raise ValueError(f"actions={tuple(actions)}: choose a non-empty subset of {ACTIONS}")
    return tuple(actions)  # type: ignore[arg-type]


def _options(prof: Profile, actions: tuple[Action, ...], overrides: Mapping[str, Any],
             tier: Tier, sample_ratio: float, selective: bool) -> list[list[Option]]:
    names = [b.name for b in prof.blocks]
    unknown = [n for n in overrides if n not in names]
    if unknown:
        raise ValueError(f"unknown block names {unknown} in overrides; the blocks are {names}")
    wins = windows(prof)
    out = []
    for b, win in zip(prof.blocks, wins, strict=True):
        if b.name in overrides:
            pol = overrides[b.name]
            pol = pol if isinstance(pol, ActivationPolicy) else ActivationPolicy(pol)
            out.append([option_for(pol, b, prof, win)])
        else:
            out.append(block_options(b, prof, win, actions, tier=tier, sample_ratio=sample_ratio,
                                     selective=selective))
    return out


def _keep_all(opts: list[list[Option]]) -> list[int] | None:
    """Each block's keep option (or its pinned override): the cheapest plan when it fits."""
    picks = []
    for block_opts in opts:
        free = [i for i, o in enumerate(block_opts)
                if o.policy.action == "keep" or len(block_opts) == 1]
        if not free:
            return None
        picks.append(free[0])
    return picks


def _notes(prof: Profile) -> tuple[str, ...]:
    notes = [f"non-block saved bytes {_mib(prof.nonblock_saved_bytes)} (head/loss "
             f"{_mib(prof.head_saved_bytes)}) are in every peak; copy d2h "
             f"{prof.d2h_bytes_per_s / 1e9:.1f} GB/s, h2d {prof.h2d_bytes_per_s / 1e9:.1f} GB/s"]
    if not prof.copy_overlaps_compute:
        notes.append(f"device {prof.device_type!r}: a swap is a memcpy in host memory on the "
                     "same cores (no overlap; it frees ledger 'device' bytes, not RAM)")
    return tuple(notes)


def plan_from_profile(
    prof: Profile, budget: int | str, *, actions: Sequence[str] = DEFAULT_ACTIONS,
    overrides: Mapping[str, ActivationPolicy | str] | None = None, tier: Tier = "cpu",
    sample_ratio: float = 0.3, selective: bool = True,
) -> BudgetPlan:
    """The cheapest plan for a measured ``Profile`` (see module doc); no model needed."""
    budget_b = parse_budget(budget, prof.unmanaged_peak_bytes)
    opts = _options(prof, _check_actions(actions), overrides or {}, tier, sample_ratio,
                    selective)
    if repeated_blocks(prof.calls):
        return _plan_calls(prof, opts, budget_b, tuple(actions), overrides or {})
    quantum = max(1, -(-max(prof.unmanaged_peak_bytes, 1) // GRID))
    base = prof.nonblock_saved_bytes - prof.head_saved_bytes
    prob = _solve.Problem(opts, base, prof.head_saved_bytes, quantum)
    picks = _solve.min_cost(prob, budget_b)
    keep_all = _keep_all(opts)
    if keep_all is not None and _solve.peak_of(prob, [o[k] for o, k in zip(
            opts, keep_all, strict=True)]) <= budget_b:
        picks = keep_all  # nothing to pay; the byte grid's rounding must not hide it
    if picks is None:
        _, low = _solve.min_peak(prob)
        reach = _solve.peak_of(prob, [opts[k][o] for k, o in enumerate(low)])
        if reach > budget_b:
            raise _too_small(budget_b, reach, tuple(actions), prof)
        picks = low  # fits exactly though not on the rounded grid
    chosen = [opts[k][o] for k, o in enumerate(picks)]
    decisions = tuple(BlockDecision(b.name, c.policy, c.held, c.transient, c.overhead_s,
                                    c.ledger_transient)
                      for b, c in zip(prof.blocks, chosen, strict=True))
    seen = _solve.peak_of(prob, chosen, ledger=True)
    notes = (*_notes(prof), f"ledger-visible predicted peak {_mib(seen)} (recompute "
             "re-materialisation happens out of the ledger's sight)")
    return BudgetPlan(
        decisions=decisions, budget_bytes=budget_b,
        unmanaged_peak_bytes=prof.unmanaged_peak_bytes,
        predicted_peak_bytes=_solve.peak_of(prob, chosen), baseline_step_s=prof.step_s,
        predicted_step_s=prof.step_s + sum(c.overhead_s for c in chosen), notes=notes,
        ledger_peak_bytes=seen,
    )


def _too_small(budget_b: int, reach: int, actions: tuple[str, ...], prof: Profile) -> ValueError:
    return ValueError(
        f"budget {budget_b} bytes ({_mib(budget_b)}) is below the minimum reachable budget "
        f"{reach} bytes ({_mib(reach)}) with actions={actions} (unmanaged peak "
        f"{_mib(prof.unmanaged_peak_bytes)}); raise the budget or allow more actions")


def _plan_calls(prof: Profile, opts: list[list[Option]], budget_b: int,
                actions: tuple[str, ...], overrides: Mapping[str, Any]) -> BudgetPlan:
    """A step with blocks that run several times per forward, priced call by call
    (``_loops``); split and sample are left out for those blocks unless pinned."""
    reps = repeated_blocks(prof.calls)
    policies = [[o.policy for o in block_opts
                 if b.name in overrides or b.name not in reps
                 or o.policy.action not in ("split", "sample")]
                for b, block_opts in zip(prof.blocks, opts, strict=True)]
    base = prof.nonblock_saved_bytes - prof.head_saved_bytes
    best, low = _loops.solve(prof, policies, windows(prof), base, budget_b)
    if best is None:
        raise _too_small(budget_b, low.peak, actions, prof)
    decisions = tuple(BlockDecision(b.name, c.policy, c.held, c.transient, c.overhead_s,
                                    c.ledger_transient)
                      for b, c in zip(prof.blocks, best.blocks, strict=True))
    shown = ", ".join(f"{n} x{r}" for n, r in sorted(reps.items()))
    notes = (*_notes(prof), f"blocks run several times per forward ({shown}): priced call by "
             "call (held bytes summed over calls, one call re-materialised or fetched back at "
             f"a time); ledger-visible predicted peak {_mib(best.ledger_peak)}")
    return BudgetPlan(
        decisions=decisions, budget_bytes=budget_b,
        unmanaged_peak_bytes=prof.unmanaged_peak_bytes, predicted_peak_bytes=best.peak,
        baseline_step_s=prof.step_s,
        predicted_step_s=prof.step_s + sum(c.overhead_s for c in best.blocks), notes=notes,
        ledger_peak_bytes=best.ledger_peak,
    )


def plan(
    model: nn.Module, sample_batch: Any, budget: int | str = "50%", *,
    actions: Sequence[str] = DEFAULT_ACTIONS, profile: Profile | None = None,
    loss_fn: LossFn | None = None, blocks: BlockSpec = None,
    overrides: Mapping[str, ActivationPolicy | str] | None = None, tier: Tier = "cpu",
    sample_ratio: float = 0.3, min_swap_bytes: int = 4096, selective: bool = True,
) -> BudgetPlan:
    """Profile ``model`` on ``sample_batch`` (unless ``profile`` is given) and plan under
    ``budget``: per block keep / recompute / swap / split (/ sample, opt-in).
    ``min_swap_bytes``: the ``ActivationOptions`` value the plan will be applied with.
    ``selective=False``: recompute is full recompute only (no ``keep_ops`` options), for a
    step that backwards a block twice (``retain_graph=True``, ``create_graph=True``)."""
    prof = profile if profile is not None else _profile(
        model, sample_batch, loss_fn, blocks, min_swap_bytes)
    modules = dict(model.named_modules())
    missing = [b.name for b in prof.blocks if b.name not in modules]
    if missing:
        raise ValueError(f"the profile names blocks {missing} that {type(model).__name__} "
                         "does not have; profile this model")
    return plan_from_profile(prof, budget, actions=actions, overrides=overrides, tier=tier,
                             sample_ratio=sample_ratio, selective=selective)


def _profile(model: nn.Module, batch: Any, loss_fn: LossFn | None, blocks: BlockSpec,
             min_swap_bytes: int) -> Profile:
    return profile(model, batch, loss_fn, blocks=blocks, min_swap_bytes=min_swap_bytes)


def compare(plan: Plan, ledger: SavedLedger, *, place: str = "device",
            cuda_peak_delta: int | None = None) -> str:
    """Predicted against measured peak saved bytes after a step under ``plan``."""
    measured = ledger.peak(place)
    seen = plan.ledger_peak_bytes if isinstance(plan, BudgetPlan) else plan.predicted_peak_bytes
    err = (seen - measured) / max(measured, 1)
    lines = [
        f"predicted peak {_mib(plan.predicted_peak_bytes)} (ledger-visible {_mib(seen)}), "
        f"measured (ledger {place!r}) {_mib(measured)} ({err:+.1%} off the ledger-visible "
        f"prediction); budget {_mib(plan.budget_bytes)}: "
        f"{'met' if measured <= plan.budget_bytes else 'EXCEEDED'}"
    ]
    if cuda_peak_delta is not None:
        lines.append(f"torch.cuda.max_memory_allocated over the step's start: "
                     f"{_mib(cuda_peak_delta)} (everything the step allocated)")
    return "\n".join(lines)
