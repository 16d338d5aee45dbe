"""The planner on synthetic profiles: budget met, exact against brute force, errors, monotony."""

from __future__ import annotations

import itertools
import math

import pytest

from memopt.activations import _solve
from memopt.activations.costmodel import block_options, windows
from memopt.activations.planner import parse_budget, plan_from_profile
from memopt.activations.policy import ActivationPolicy
from memopt.activations.profile import BlockProfile, Profile

MiB = 2**20


def synthetic(n: int = 4, device: str = "cpu", saved: list[int] | None = None,
              fwd: list[float] | None = None, bw: float = 1e9) -> Profile:
    saved = saved or [(8 + 2 * (i % 3)) * MiB for i in range(n)]
    fwd = fwd or [0.010 + 0.002 * i for i in range(n)]
    blocks = tuple(
        BlockProfile(f"layers.{i}", saved[i], MiB, MiB, saved[i] // 2, fwd[i], 2 * fwd[i],
                     True, ((64, (saved[i] // 2) // 256, 4),), split_input_bytes=3 * MiB)
        for i in range(n)
    )
    return Profile(blocks, nonblock_saved_bytes=3 * MiB, head_saved_bytes=2 * MiB,
                   measured_peak_bytes=0, step_s=0.2, head_forward_s=0.004,
                   head_backward_s=0.008, d2h_bytes_per_s=bw, h2d_bytes_per_s=bw,
                   device_type=device)


def brute_force(prof: Profile, budget: int, actions: tuple[str, ...]) -> tuple[float, int]:
    """(cheapest overhead, smallest peak) over every combination of options."""
    wins = windows(prof)
    opts = [block_options(b, prof, w, actions) for b, w in zip(prof.blocks, wins, strict=True)]
    prob = _solve.Problem(opts, prof.nonblock_saved_bytes - prof.head_saved_bytes,
                          prof.head_saved_bytes, 1)
    best, low = math.inf, math.inf
    for combo in itertools.product(*opts):
        peak = _solve.peak_of(prob, combo)
        low = min(low, peak)
        if peak <= budget:
            best = min(best, sum(o.overhead_s for o in combo))
    return best, int(low)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("share", [0.9, 0.6, 0.45, 0.38])
def test_plan_meets_budget_and_matches_brute_force(device: str, share: float) -> None:
    prof = synthetic(device=device, bw=2e9)
    budget = int(share * prof.unmanaged_peak_bytes)
    actions = ("keep", "recompute", "swap", "split")
    best, _ = brute_force(prof, budget, actions)
    plan = plan_from_profile(prof, budget, actions=actions)
    assert plan.predicted_peak_bytes <= budget
    overhead = plan.predicted_step_s - plan.baseline_step_s
    # exact up to the byte grid (unmanaged / 4096 per block, rounded up)
    assert best <= overhead + 1e-12
    assert overhead == pytest.approx(best, abs=1e-8)
    print(plan.table())


def test_exact_on_loose_grid_cases() -> None:
    prof = synthetic(n=5, device="cuda", bw=5e8)
    actions = ("keep", "recompute", "swap")
    for share in (0.95, 0.7, 0.5, 0.4):
        budget = int(share * prof.unmanaged_peak_bytes)
        best, _ = brute_force(prof, budget, actions)
        plan = plan_from_profile(prof, budget, actions=actions)
        assert plan.predicted_step_s - plan.baseline_step_s == pytest.approx(best, abs=1e-8)


def test_budget_below_minimum_names_it() -> None:
    prof = synthetic()
    _, low = brute_force(prof, 0, ("keep", "recompute", "swap", "split"))
    with pytest.raises(ValueError, match="minimum reachable budget") as err:
        plan_from_profile(prof, low - 1)
    msg = str(err.value)
    reached = int(msg.split("minimum reachable budget ")[1].split(" bytes")[0])
    grid = prof.unmanaged_peak_bytes / 4096 * len(prof.blocks)
    assert low <= reached <= low + grid
    assert f"({reached / MiB:.2f} MiB)" in msg
    # the named minimum is itself a valid budget
    assert plan_from_profile(prof, reached).predicted_peak_bytes <= reached


def test_more_budget_never_predicts_a_slower_step() -> None:
    prof = synthetic(n=6, device="cuda", bw=1e9)
    steps = []
    for pct in range(30, 101, 5):
        try:
            steps.append(plan_from_profile(prof, f"{pct}%").predicted_step_s)
        except ValueError:
            continue
    assert len(steps) >= 10
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(steps))
    assert steps[-1] == prof.step_s  # the whole budget: nothing to pay
    # a free (fully hidden) swap does not displace keep when the budget allows keep
    cuda = synthetic(device="cuda", bw=1e12)
    assert {d.policy.action for d in plan_from_profile(cuda, "100%").decisions} == {"keep"}


def test_cpu_swap_pays_the_whole_copy_cuda_hides_it() -> None:
    cpu, cuda = synthetic(device="cpu", bw=1e10), synthetic(device="cuda", bw=1e10)
    pol = ActivationPolicy("swap")
    b = cpu.blocks[1]
    from memopt.activations.costmodel import option_for
    on_cpu = option_for(pol, b, cpu, windows(cpu)[1])
    on_cuda = option_for(pol, b, cuda, windows(cuda)[1])
    assert on_cpu.overhead_s == pytest.approx(2 * b.saved_bytes / 1e10)
    assert on_cuda.overhead_s == 0.0  # 1 ms of copy under a 14 ms forward / 28 ms backward
    assert on_cpu.held == 0 and on_cpu.transient == b.saved_bytes
    # with hidden copies, mixing in swap beats recompute alone at the same budget
    plan = plan_from_profile(cuda, "50%")
    only = plan_from_profile(cuda, "50%", actions=("keep", "recompute"))
    assert "swap" in {d.policy.action for d in plan.decisions}
    assert plan.predicted_step_s < only.predicted_step_s


def test_selective_recompute_option() -> None:
    from dataclasses import replace

    from memopt.activations.costmodel import option_for
    prof = synthetic()
    b = replace(prof.blocks[0], keep_ops=("aten.mm",), kept_out_bytes=3 * MiB,
                kept_saved_bytes=2 * MiB, kept_fraction=0.75)
    win = windows(prof)[0]
    opt = option_for(ActivationPolicy("recompute", keep_ops=("aten.mm",)), b, prof, win)
    assert opt.held == b.input_bytes + 3 * MiB
    assert opt.transient == b.saved_bytes - b.input_bytes - 2 * MiB
    assert opt.overhead_s == pytest.approx(0.25 * b.forward_s)
    assert opt.ledger_transient == 0  # re-materialised inside torch's checkpoint
    with pytest.raises(ValueError, match="keep_ops"):
        option_for(ActivationPolicy("recompute", keep_ops=("aten.bmm",)), b, prof, win)


def test_sample_is_opt_in_and_overrides_are_checked() -> None:
    prof = synthetic()
    plan = plan_from_profile(prof, "60%")
    assert "sample" not in {d.policy.action for d in plan.decisions}
    sampled = plan_from_profile(prof, "60%", actions=("keep", "recompute", "sample"))
    assert "sample" in {d.policy.action for d in sampled.decisions}
    assert sampled.predicted_step_s < plan.predicted_step_s
    pinned = plan_from_profile(prof, "60%", overrides={"layers.0": "recompute"})
    assert pinned.policies()["layers.0"].action == "recompute"
    with pytest.raises(ValueError, match="unknown block names .*layers.9"):
        plan_from_profile(prof, "60%", overrides={"layers.9": "swap"})
    with pytest.raises(ValueError, match="actions"):
        plan_from_profile(prof, "60%", actions=("offload",))


def test_parse_budget() -> None:
    assert parse_budget("6GiB", 0) == 6 * 2**30
    assert parse_budget("1.5 GB", 0) == 1_500_000_000
    assert parse_budget("50%", 1000) == 500
    assert parse_budget(4096, 0) == 4096
    for bad in ("six GiB", "5 parsecs", "-3MiB"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad, 100)
    with pytest.raises(ValueError, match="positive"):
        parse_budget(0, 100)
    assert parse_budget(1.5e3, 100) == 1500  # a float byte count, as config sizes take
    with pytest.raises(TypeError):
        parse_budget([1], 100)  # type: ignore[arg-type]
