"""Saved-tensor hooks turn off autograd's check that a saved tensor was not modified in place
before backward; every memopt policy that installs hooks must make that check itself, or an
in-place change gives a silently wrong gradient. In-place ops that autograd allows must keep
working (and giving the same gradients) under every policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.activations import ActivationOptions, apply, measure_step
from memopt.activations.policy import keep, sample, split, swap

X = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
OPTS = ActivationOptions(min_swap_bytes=0)
POLICIES = {"keep": keep(), "swap": swap(), "sample": sample(1.0), "split": split(0.5)}


def _pair() -> nn.Sequential:
    torch.manual_seed(0)  # the inner block's Sigmoid saves its output
    return nn.Sequential(nn.Sequential(nn.Linear(16, 16), nn.Sigmoid()), nn.Linear(16, 1))


@pytest.mark.parametrize("name", ["keep", "swap", "sample"])
def test_saved_tensor_modified_in_place_is_an_error(name: str) -> None:
    plain = _pair()
    h = plain[0](X)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        plain[1](h).sum().backward()  # what torch does

    model = _pair()
    with apply(model, {"0": POLICIES[name]}, options=OPTS):
        h = model[0](X)
        h.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            model[1](h).sum().backward()


def test_split_copies_what_it_saves() -> None:
    """split's kept part is counted, its swapped part copied at pack time: the gradient is
    that of the values at save time (no error needed, and none raised)."""
    ref = _pair()
    (ref[1](ref[0](X) * 2)).sum().backward()
    model = _pair()
    with apply(model, {"0": split(0.5)}, options=OPTS):
        h = model[0](X)
        h.mul_(2)
        model[1](h).sum().backward()
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_measure_step_checks_saves_outside_blocks() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.blk, self.b = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.sigmoid(self.a(x))
            out = self.b(self.blk(h)).sum()
            h.mul_(2)  # sigmoid's saved output, outside the managed block
            return out

    torch.manual_seed(0)
    net = Net()
    with apply(net, {"blk": swap()}) as mgr:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            measure_step(net, X, mgr.ledger, loss_fn=lambda m, b: m(b))


class _Block(nn.Module):
    """In-place ops autograd accepts: ReLU/SiLU(inplace) after a linear layer, sigmoid_ on a
    linear output, += and tanh_ on a fresh tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.act1, self.act2 = nn.ReLU(inplace=True), nn.SiLU(inplace=True)
        self.ln = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l3(self.act2(self.l2(self.act1(self.l1(x)))))
        h = self.ln(h.sigmoid_())
        h += x
        return h.tanh_()


@pytest.mark.parametrize("name", ["keep", "swap", "sample"])
def test_allowed_in_place_ops_give_the_same_gradients(name: str) -> None:
    def grads(policy):
        torch.manual_seed(0)
        model = nn.Sequential(_Block(), nn.Linear(16, 1))
        if policy is None:
            model(X).sum().backward()
        else:
            with apply(model, {"0": policy}, options=OPTS):
                model(X).sum().backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads(None), grads(POLICIES[name]), strict=True):
        assert torch.equal(a, b)
