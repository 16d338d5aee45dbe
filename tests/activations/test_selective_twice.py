"""A second backward through a selectively recomputed block: memopt's error names the block and
the fix; ``plan(..., selective=False)`` leaves selective recompute out, and full recompute or
swap take ``retain_graph=True`` / ``create_graph=True`` double backwards."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import memopt.activations as act
from memopt.activations.policy import recompute, swap
from tests.activations._models import make_stack, stack_loss

NAMES = [f"blocks.{i}" for i in range(4)]
X = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))


def _retain_twice(model: nn.Module) -> None:
    loss = stack_loss(X)(model)
    loss.backward(retain_graph=True)
    loss.backward()


def _penalty(model: nn.Module) -> None:
    loss = stack_loss(X)(model)
    gs = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    (loss + sum((g**2).sum() for g in gs)).backward()


def _grads(model: nn.Module, step) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    step(model)
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def fixed_profile() -> act.Profile:
    """The stack's measured bytes, with fixed times so the plans do not depend on the clock:
    selective recompute is much cheaper than full recompute (90% of the forward kept)."""
    prof = act.profile(make_stack(), X, lambda m, b: stack_loss(b)(m), blocks=NAMES)
    assert all(b.keep_ops == ("aten.addmm",) for b in prof.blocks)
    blocks = tuple(replace(b, forward_s=0.01, backward_s=0.02, kept_fraction=0.9)
                   for b in prof.blocks)
    return replace(prof, blocks=blocks, step_s=0.1, head_forward_s=0.001, head_backward_s=0.002)


@pytest.mark.parametrize("step", [_retain_twice, _penalty], ids=["retain_graph", "create_graph"])
def test_second_backward_names_the_block_and_the_fix(step) -> None:  # type: ignore[no-untyped-def]
    model = make_stack()
    policies = {n: recompute() for n in NAMES} | {"blocks.2": recompute(keep_ops=("aten.addmm",))}
    with act.apply(model, policies):
        with pytest.raises(RuntimeError) as info:
            step(model)
    msg = str(info.value)
    assert "'blocks.2'" in msg and "recompute[keep aten.addmm]" in msg
    assert "backwarded only once" in msg
    assert "overrides={'blocks.2': 'recompute'}" in msg and "selective=False" in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__).startswith("Trying to backward an extra time")  # torch's


def test_other_recompute_errors_pass_through_unchanged() -> None:
    from memopt.activations.recompute import _SelectiveRecompute

    ctx = _SelectiveRecompute("b", "recompute[keep aten.mm]", torch.no_grad())
    other = RuntimeError("Tensor cached during selective activation checkpoint has been mutated")
    for _ in range(2):  # re-enterable: a second backward replays again
        with pytest.raises(RuntimeError) as info:
            with ctx:
                assert not torch.is_grad_enabled()
                raise other
        assert info.value is other
    assert torch.is_grad_enabled()


def test_selective_false_never_picks_keep_ops(fixed_profile: act.Profile) -> None:
    picked_selective = False
    for share in ("90%", "75%", "60%", "50%"):
        on = act.plan_from_profile(fixed_profile, share, actions=("keep", "recompute"))
        off = act.plan_from_profile(fixed_profile, share, actions=("keep", "recompute"),
                                    selective=False)
        picked_selective |= any(d.policy.keep_ops for d in on.decisions)
        assert not any(d.policy.keep_ops for d in off.decisions), off.table()
        assert off.predicted_peak_bytes <= off.budget_bytes
    assert picked_selective, "the default must pick selective somewhere for this to mean much"
    pinned = act.plan_from_profile(fixed_profile, "75%", selective=False,
                                   overrides={"blocks.0": recompute(keep_ops=("aten.addmm",))})
    assert pinned.decisions[0].policy.keep_ops == ("aten.addmm",)  # an override is as given


@pytest.mark.parametrize("step", [_retain_twice, _penalty], ids=["retain_graph", "create_graph"])
def test_double_backward_under_a_selective_false_plan(fixed_profile, step) -> None:  # type: ignore[no-untyped-def]
    model = make_stack()
    ref = _grads(model, step)
    on = act.plan(model, X, "50%", actions=("keep", "recompute"), profile=fixed_profile)
    assert any(d.policy.keep_ops for d in on.decisions)
    with act.apply(model, on), pytest.raises(RuntimeError, match="selective=False"):
        step(model)
    off = act.plan(model, X, "50%", actions=("keep", "recompute"), profile=fixed_profile,
                   selective=False)
    assert {d.policy.action for d in off.decisions} == {"recompute"}
    with act.apply(model, off):
        torch.testing.assert_close(_grads(model, step), ref, rtol=1e-6, atol=1e-7)
    with act.apply(model, {n: swap() for n in NAMES},
                   options=act.ActivationOptions(min_swap_bytes=1024)) as mgr:
        torch.testing.assert_close(_grads(model, step), ref, rtol=1e-6, atol=1e-7)
        assert mgr.ledger.peak("host") > 0  # something was swapped
