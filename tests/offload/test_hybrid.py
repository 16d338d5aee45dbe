"""Hybrid CPU/device update scheduler against a simulated device with given costs."""

from __future__ import annotations

import itertools
import random

import pytest

from memopt.offload.hybrid import ByteCosts, HybridScheduler, Rates


class FakeDevice:
    """Runs a plan with known true rates; reports per-resource timings (optionally noisy)."""

    def __init__(self, rates: Rates, costs: ByteCosts, noise: float = 0.0, seed: int = 0) -> None:
        self.rates, self.costs, self.noise = rates, costs, noise
        self.rng = random.Random(seed)

    def _t(self, amount: float, rate: float) -> float:
        return amount / rate * (1 + self.rng.uniform(-self.noise, self.noise))

    def step(self, sched: HybridScheduler, placement) -> None:
        """One step: each group is timed on the resources its path uses, as a real run would."""
        c, r = self.costs, self.rates
        for n, where in zip(sched.sizes, placement, strict=True):
            if where == "cpu":
                sched.observe("d2h", n * c.grad_bytes, self._t(n * c.grad_bytes, r.d2h))
                sched.observe("cpu", n, self._t(n, r.cpu))
                sched.observe("h2d", n * c.param_bytes, self._t(n * c.param_bytes, r.h2d))
            else:
                sched.observe("h2d", n * c.state_bytes, self._t(n * c.state_bytes, r.h2d))
                sched.observe("device", n, self._t(n, r.device))
                sched.observe("d2h", n * c.state_bytes, self._t(n * c.state_bytes, r.d2h))


def brute_force(sched: HybridScheduler) -> float:
    return min(
        sched.predict(p) for p in itertools.product(("cpu", "device"), repeat=len(sched.sizes))
    )


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    sizes = [rng.randint(1, 5000) * rng.choice((1, 7, 1000)) for _ in range(n)]
    rates = Rates(
        cpu=10 ** rng.uniform(8, 10),
        device=10 ** rng.uniform(9, 11),
        h2d=10 ** rng.uniform(9, 11),
        d2h=10 ** rng.uniform(9, 11),
    )
    costs = ByteCosts(rng.choice((2, 4)), rng.choice((2, 4)), rng.choice((8, 12, 16)))
    sched = HybridScheduler(sizes, costs=costs, prior=rates)
    plan = sched.plan()
    assert plan.makespan == pytest.approx(brute_force(sched), rel=1e-12)
    assert plan.makespan == pytest.approx(sched.predict(plan.placement), rel=1e-12)


def test_measured_rates_replace_priors() -> None:
    costs = ByteCosts()
    true = Rates(cpu=2e8, device=4e9, h2d=8e9, d2h=8e9)
    sched = HybridScheduler([1000] * 6, costs=costs, prior=Rates())  # priors far off
    FakeDevice(true, costs).step(sched, ["cpu"] * 3 + ["device"] * 3)
    for name in ("cpu", "device", "h2d", "d2h"):
        assert getattr(sched.rates, name) == pytest.approx(getattr(true, name), rel=1e-9)
    assert sched.plan().makespan == pytest.approx(brute_force(sched))


def _run(sched: HybridScheduler, dev: FakeDevice, steps: int) -> list[tuple[str, ...]]:
    plans = []
    for _ in range(steps):
        plan = sched.plan()
        plans.append(plan.placement)
        dev.step(sched, plan.placement)
    return plans


def test_adapts_when_rates_change() -> None:
    costs = ByteCosts()
    sizes = [3, 5, 8, 13, 21, 34, 55, 89]  # x 1e6 parameters
    sizes = [s * 1_000_000 for s in sizes]
    fast_cpu = Rates(cpu=3e9, device=2e10, h2d=2.5e10, d2h=2.5e10)
    sched = HybridScheduler(sizes, costs=costs, prior=fast_cpu, ema=0.5)
    dev = FakeDevice(fast_cpu, costs, noise=0.02)
    first = _run(sched, dev, 5)[-1]
    cpu_share = sum(n for n, w in zip(sizes, first, strict=True) if w == "cpu")
    # Another job takes the CPU: updates there get 5x slower.
    dev.rates = Rates(cpu=6e8, device=2e10, h2d=2.5e10, d2h=2.5e10)
    last = _run(sched, dev, 15)[-1]
    new_share = sum(n for n, w in zip(sizes, last, strict=True) if w == "cpu")
    assert new_share < cpu_share
    truth = HybridScheduler(sizes, costs=costs, prior=dev.rates, hysteresis=0.0)
    # Near the true optimum (within the hysteresis and the 2% noise).
    assert truth.predict(last) <= brute_force(truth) * 1.08


def test_stable_under_noise() -> None:
    """+-10% timing noise around rates where two plans are close: no flip-flopping."""
    costs = ByteCosts()
    sizes = [10_000_000] * 8
    rates = Rates(cpu=1e9, device=1e10, h2d=1.2e10, d2h=1.2e10)
    sched = HybridScheduler(sizes, costs=costs, prior=rates, ema=0.3, hysteresis=0.05)
    plans = _run(sched, FakeDevice(rates, costs, noise=0.10, seed=1), 200)
    changes = sum(a != b for a, b in itertools.pairwise(plans))
    assert changes <= 2
    # The same noise without hysteresis and with a jumpy average does flip: the test bites.
    jumpy = HybridScheduler(sizes, costs=costs, prior=rates, ema=1.0, hysteresis=0.0)
    plans = _run(jumpy, FakeDevice(rates, costs, noise=0.10, seed=1), 200)
    assert sum(a != b for a, b in itertools.pairwise(plans)) > 10


def test_many_groups_near_optimal() -> None:
    rng = random.Random(7)
    sizes = [rng.randint(1, 10**8) for _ in range(300)]  # inexact units (quantized)
    sched = HybridScheduler(sizes, prior=Rates(cpu=1e9, device=3e10, h2d=2e10, d2h=2e10))
    plan = sched.plan()
    bound = max(sched._loads_at(sched._continuous_best()).values())
    assert bound <= plan.makespan <= bound * 1.001


def test_extremes_and_api() -> None:
    sched = HybridScheduler({"a": 10, "b": 20}, prior=Rates(cpu=1e3, device=1e12))
    plan = sched.plan()
    assert plan.placement == ("device", "device") and plan.groups_on("device") == [0, 1]
    assert sched.names == ["a", "b"]
    slow_dev = HybridScheduler([10, 20], prior=Rates(cpu=1e12, device=1e3))
    assert slow_dev.plan().groups_on("cpu") == [0, 1]
    with slow_dev.timed("cpu", 1000):
        pass
    assert slow_dev.rates.cpu != 1e12
    slow_dev.observe("cpu", 0, 1.0)  # nothing measured: ignored


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": []}, "positive integer"),
        ({"groups": [1, 0]}, "positive integer"),
        ({"groups": [1], "ema": 0}, "ema"),
        ({"groups": [1], "hysteresis": -1}, "hysteresis"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HybridScheduler(**kwargs)


def test_bad_inputs() -> None:
    sched = HybridScheduler([1, 2])
    with pytest.raises(ValueError, match="resource"):
        sched.observe("gpu", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placement"):
        sched.predict(["cpu"])
    with pytest.raises(ValueError, match="Rates.cpu"):
        Rates(cpu=0)


def test_without_overlap_every_group_takes_the_cheaper_path() -> None:
    sizes = [3, 5, 7, 11]
    costs = ByteCosts()
    for rates, expect in ((Rates(cpu=1e9, device=5e10, h2d=1e12, d2h=1e12), "device"),
                          (Rates(cpu=1e9, device=5e10, h2d=1e9, d2h=1e9), "cpu")):  # fmt: skip
        sched = HybridScheduler(sizes, costs=costs, prior=rates, overlap=False)
        plan = sched.plan()
        assert set(plan.placement) == {expect}
        assert plan.makespan == pytest.approx(sum(sched.loads(plan.placement).values()))
        assert plan.makespan == pytest.approx(brute_force(sched))
