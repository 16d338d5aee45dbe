"""Hybrid CPU/device optimizer update scheduler (the Deep Optimizer States idea).

With optimizer state offloaded to host memory, each parameter group can be updated either on
the CPU (gradients go device -> host, the CPU runs the update, the updated low-precision
parameters go host -> device) or on the device (the fp32 master weights and moments go host ->
device, the device runs the update, they come back device -> host). Which is faster depends on
rates measured during the run, so ``HybridScheduler`` keeps an exponential moving average of
four observed rates and plans from them:

    cpu    parameters/s updated by the CPU          device  parameters/s updated by the device
    h2d    bytes/s host -> device                   d2h     bytes/s device -> host

Cost model. The step streams groups through four resources that work concurrently (CPU,
device, one link each way), so with transfers overlapped the makespan is bounded by the
busiest one: with ``C`` the parameters updated on the CPU and ``D = total - C``,

    cpu = C / r_cpu                  h2d = (C * param_bytes + D * state_bytes) / r_h2d
    dev = D / r_dev                  d2h = (C * grad_bytes  + D * state_bytes) / r_d2h
    makespan = max(cpu, dev, h2d, d2h)      (the fill/drain of one group is ignored)

Every load is linear in ``C`` alone, so the makespan is a convex function of ``C`` and the
best plan is the achievable subset sum of group sizes nearest its continuous minimiser, on
one side or the other. Subset sums are a bitset (a Python int) over size units: the gcd of the
sizes when that gives at most 2**20 units (exact), otherwise ``total / 2**16`` (near-optimal).
One bitset per prefix reconstructs the subset.

Without overlap (``overlap=False``: an implementation that runs each group's copies and
update one after another, as ``hybrid_update.HybridUpdate`` does today), the step takes the
sum of the four loads, which is linear in ``C``: the best plan then puts everything on the
path with the lower cost per parameter, and the scheduler's job reduces to measuring which.

Stability: the current plan is kept unless the best one is predicted faster by more than
``hysteresis`` (relative), both judged with the current estimates, so measurement noise does
not make groups flip between CPU and device every step; a real change of rates does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["ByteCosts", "HybridPlan", "HybridScheduler", "Rates"]

Resource = Literal["cpu", "device", "h2d", "d2h"]
Where = Literal["cpu", "device"]
RESOURCES: tuple[Resource, ...] = ("cpu", "device", "h2d", "d2h")
_EXACT_UNITS = 1 << 20
_APPROX_UNITS = 1 << 16


@dataclass(frozen=True)
class Rates:
    """cpu / device: parameters updated per second; h2d / d2h: bytes per second.

    The defaults are rough priors (a memory-bound CPU AdamW, a PCIe 4 x16 link, a
    datacenter GPU); each is replaced by the first measurement of its resource."""

    cpu: float = 1.0e9
    device: float = 5.0e10
    h2d: float = 2.0e10
    d2h: float = 2.0e10

    def __post_init__(self) -> None:
        for name in RESOURCES:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Rates.{name} must be a positive finite number, got {value}")


@dataclass(frozen=True)
class ByteCosts:
    """Bytes per parameter each path moves.

    grad_bytes: CPU path, gradient device -> host (2 for bf16 gradients).
    param_bytes: CPU path, updated parameters host -> device (2 for bf16 weights).
    state_bytes: device path, state moved each way (12: fp32 master weights + two moments).
    """

    grad_bytes: float = 2.0
    param_bytes: float = 2.0
    state_bytes: float = 12.0

    def __post_init__(self) -> None:
        for name in ("grad_bytes", "param_bytes", "state_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"ByteCosts.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class HybridPlan:
    """Where each group is updated, with the predicted per-resource seconds and makespan."""

    placement: tuple[Where, ...]
    loads: Mapping[Resource, float]
    makespan: float

    def groups_on(self, where: Where) -> list[int]:
        return [i for i, w in enumerate(self.placement) if w == where]


class HybridScheduler:
    """Measured rates in, a CPU/device placement per group out.

    ``groups``: parameter counts per group (a sequence, or a name -> count mapping whose
    order is kept). Feed timings with ``observe`` (or the ``timed`` context manager; for the
    device, synchronize before leaving it) and ask ``plan()`` once per step.
    """

    def __init__(
        self,
        groups: Sequence[int] | Mapping[str, int],
        *,
        costs: ByteCosts | None = None,
        prior: Rates | None = None,
        ema: float = 0.3,
        hysteresis: float = 0.05,
        overlap: bool = True,
    ) -> None:
        sizes = list(groups.values()) if isinstance(groups, Mapping) else list(groups)
        self.names = (
            list(groups) if isinstance(groups, Mapping) else [str(i) for i in range(len(sizes))]
        )
        if not sizes or any(int(n) != n or n < 1 for n in sizes):
            raise ValueError(f"groups must be one or more positive integer sizes, got {sizes}")
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        self.sizes = [int(n) for n in sizes]
        self.total = sum(self.sizes)
        self.costs = costs or ByteCosts()
        self.ema = ema
        self.hysteresis = hysteresis
        self.overlap = overlap  # False: the resources work one after another (sum of loads)
        self._rates = prior or Rates()
        self._measured: set[Resource] = set()
        self._current: tuple[Where, ...] | None = None
        self._bits = _SubsetSums(self.sizes)

    # --- measurements ----------------------------------------------------------------------

    def observe(self, resource: Resource, amount: float, seconds: float) -> None:
        """Record that ``resource`` handled ``amount`` (parameters or bytes) in ``seconds``."""
        if resource not in RESOURCES:
            raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
        if amount <= 0 or seconds <= 0:
            return  # nothing measurable (an empty group, or a timer too coarse)
        sample = amount / seconds
        old = getattr(self._rates, resource)
        new = sample if resource not in self._measured else old + self.ema * (sample - old)
        self._measured.add(resource)
        self._rates = replace(self._rates, **{resource: new})

    @contextmanager
    def timed(self, resource: Resource, amount: float) -> Iterator[None]:
        """Time the body with ``perf_counter`` and ``observe`` it."""
        t0 = time.perf_counter()
        yield
        self.observe(resource, amount, time.perf_counter() - t0)

    @property
    def rates(self) -> Rates:
        """The current estimates (priors for resources not measured yet)."""
        return self._rates

    # --- the model -------------------------------------------------------------------------

    def _lines(self) -> dict[Resource, tuple[float, float]]:
        """Each resource's load as ``a + b * C`` seconds, C = parameters updated on the CPU."""
        r, c, t = self._rates, self.costs, self.total
        return {
            "cpu": (0.0, 1.0 / r.cpu),
            "device": (t / r.device, -1.0 / r.device),
            "h2d": (t * c.state_bytes / r.h2d, (c.param_bytes - c.state_bytes) / r.h2d),
            "d2h": (t * c.state_bytes / r.d2h, (c.grad_bytes - c.state_bytes) / r.d2h),
        }

    def _loads_at(self, on_cpu: float) -> dict[Resource, float]:
        return {k: a + b * on_cpu for k, (a, b) in self._lines().items()}

    def loads(self, placement: Sequence[Where]) -> dict[Resource, float]:
        """Predicted busy seconds of each resource for ``placement``."""
        if len(placement) != len(self.sizes) or any(w not in ("cpu", "device") for w in placement):
            raise ValueError(
                f"placement must give 'cpu' or 'device' for each of {len(self.sizes)} groups"
            )
        return self._loads_at(
            sum(n for n, w in zip(self.sizes, placement, strict=True) if w == "cpu")
        )

    def predict(self, placement: Sequence[Where]) -> float:
        """Predicted makespan of one step with ``placement`` (the busiest resource; the sum
        of the loads without overlap)."""
        return self._combine(self.loads(placement))

    def _combine(self, loads: Mapping[Resource, float]) -> float:
        return max(loads.values()) if self.overlap else sum(loads.values())

    def _continuous_best(self) -> float:
        """The minimiser over real C in [0, total] of the max of the four lines."""
        lines = list(self._lines().values())
        points = {0.0, float(self.total)}
        for i, (a1, b1) in enumerate(lines):
            for a2, b2 in lines[i + 1 :]:
                if b1 != b2:
                    x = (a2 - a1) / (b1 - b2)
                    if 0 <= x <= self.total:
                        points.add(x)
        return min(points, key=lambda x: self._combine(self._loads_at(x)))

    def best_plan(self) -> HybridPlan:
        """The best placement under the current estimates, ignoring the current plan."""
        target = self._continuous_best()
        options = [self._bits.nearest(target, below=True), self._bits.nearest(target, below=False)]
        placements = [p for p in options if p is not None]
        best = min(placements, key=lambda p: (self.predict(p), p))
        return self._plan(best)

    def _plan(self, placement: tuple[Where, ...]) -> HybridPlan:
        loads = self.loads(placement)
        return HybridPlan(placement, loads, self._combine(loads))

    def plan(self) -> HybridPlan:
        """The placement for the next step: the best one, unless the current is nearly as good."""
        best = self.best_plan()
        if self._current is not None:
            keep = self.predict(self._current)
            if keep <= best.makespan * (1 + self.hysteresis):
                return self._plan(self._current)
        self._current = best.placement
        return best


class _SubsetSums:
    """Achievable subset sums of the group sizes, in units, with prefix bitsets to rebuild."""

    def __init__(self, sizes: list[int]) -> None:
        total = sum(sizes)
        g = math.gcd(*sizes)
        if total // g > _EXACT_UNITS:
            g = max(1, math.ceil(total / _APPROX_UNITS))
        self.unit = g
        self.units = [max(1, round(n / g)) if g > 1 else n for n in sizes]
        self.prefix = [1]  # prefix[i]: bit s set when the first i groups can sum to s units
        for u in self.units:
            self.prefix.append(self.prefix[-1] | (self.prefix[-1] << u))

    def nearest(self, target: float, below: bool) -> tuple[Where, ...] | None:
        """The placement whose CPU units are the reachable sum nearest ``target`` on a side."""
        bits = self.prefix[-1]
        x = target / self.unit
        p = max(0, min(sum(self.units), math.floor(x) if below else math.ceil(x)))
        if below:
            masked = bits & ((1 << (p + 1)) - 1)
            if not masked:
                return None
            s = masked.bit_length() - 1
        else:
            high = bits >> p
            if not high:
                return None
            s = p + (high & -high).bit_length() - 1
        return self._rebuild(s)

    def _rebuild(self, s: int) -> tuple[Where, ...]:
        out: list[Where] = []
        for i in range(len(self.units) - 1, -1, -1):
            if (self.prefix[i] >> s) & 1:
                out.append("device")
            else:
                out.append("cpu")
                s -= self.units[i]
        assert s == 0
        return tuple(reversed(out))
