"""Swap on saves of unusual kinds: lazy conjugate / negative views, a released record's storage."""

from __future__ import annotations

import copy

import torch
from torch import nn

from memopt.activations import ActivationOptions, apply
from memopt.activations.policy import split, swap
from memopt.offload.arena import ArenaConfig, PinnedArena

OPTS = ActivationOptions(min_swap_bytes=1024)


def _arena() -> PinnedArena:
    return PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))


def _grads(model: nn.Module, loss_fn) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return [p.grad.clone() for p in model.parameters()]


class _SpectralMix(nn.Module):
    """``mul`` saves ``fft(x).conj()``, a lazy conjugate view (x's bytes plus the conj bit)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32, dtype=torch.cfloat) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        X = torch.fft.fft(x, dim=-1)
        return torch.fft.ifft(X.conj() * self.w, dim=-1).real


class _NegView(nn.Module):
    """``mul`` saves a lazy negative view of ``h``, and ``sin`` saves ``h`` itself (dedup)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        n = torch._neg_view(h)
        assert n.is_neg()
        return (n * self.w).sum(-1, keepdim=True) + h.sin()


def test_conj_and_neg_views_keep_their_bits() -> None:
    torch.manual_seed(0)
    for block in (_SpectralMix(), _NegView()):
        ref = nn.Sequential(block)
        x = torch.randn(32, 32)

        def loss(m: nn.Module, x: torch.Tensor = x) -> torch.Tensor:
            return m(x).pow(2).sum()

        want = _grads(ref, loss)
        model = copy.deepcopy(ref)
        with apply(model, {"0": swap()}, arena=_arena(), options=OPTS) as mgr:
            got = _grads(model, loss)
            assert mgr.swap.stats["swapped"] > 0
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), (type(block).__name__, (g - w).abs().max())


class _LogsThenUses(nn.Module):
    """A temporary saves ``x`` and dies inside the forward (its node is freed by ``.item()``),
    then the linear layer saves ``x`` again: the same storage at the same version."""

    _memopt_token_local = True

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.last_norm = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_norm = x.pow(2).sum().item()
        return self.lin(x)


def test_dedup_does_not_reuse_a_released_record() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(_LogsThenUses(), _LogsThenUses())
    x = torch.randn(4, 64, 64, requires_grad=True)

    def loss(m: nn.Module) -> torch.Tensor:
        return m(x).sum()

    want = _grads(ref, loss)
    for policy in (swap(), split(0.5)):
        model = copy.deepcopy(ref)
        with apply(model, {"0": policy, "1": policy}, arena=_arena(), options=OPTS) as mgr:
            got = _grads(model, loss)  # raised "released before its backward used it"
            assert mgr.swap.pool.live_slots() == 0
        for g, w in zip(got, want, strict=True):
            if policy.action == "swap":
                assert torch.equal(g, w)
            else:  # split sums the weight gradient over two pieces: float rounding only
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
