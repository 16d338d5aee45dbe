"""Every memopt optimizer steps a small model in bf16, fp16 and fp32, with the moments in the
parameter dtype, in fp32 or in int8: the weights stay finite and move by about what the
learning rate allows. Before these checks APOLLO overflowed on fp16 weights (its channel
factor cast to fp16 alone), torch's eps placement divided by zero in fp16 arithmetic, and
Natural GaLore could not step bf16 weights at all. fp16 moments themselves (fp16 weights,
``state_dtype=None``) lose small second moments to underflow, as torch's AdamW's do: that
case is warned about, not fixed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import memopt.optim as mo
from memopt._utils.logging import _reset_warn_once
from memopt.optim import param_groups
from memopt.optim._moments import FP16_MOMENTS
from memopt.optim.apollo import mini_groups


def _groups(m: nn.Module, **kw):
    return param_groups(m, target="all-linear", update_proj_gap=3, **kw)


BUILDERS = {
    "adamw": lambda m, **k: mo.AdamW(m.parameters(), **k),
    "galore svd": lambda m, **k: mo.GaLoreAdamW(_groups(m, rank=4), **k),
    "galore subspace": lambda m, **k: mo.GaLoreAdamW(_groups(m, rank=4, proj="subspace"), **k),
    "galore full": lambda m, **k: mo.GaLoreAdamW(_groups(m, rank=4, proj_type="full"), **k),
    "galore rotate": lambda m, **k: mo.GaLoreAdamW(_groups(m, rank=4, moments="rotate"), **k),
    "galore bf16 GEMMs": lambda m, **k: mo.GaLoreAdamW(
        _groups(m, rank=4, matmul_dtype="bfloat16"), **k
    ),
    "apollo": lambda m, **k: mo.ApolloAdamW(_groups(m, rank=4), **k),
    "apollo-mini": lambda m, **k: mo.ApolloMini(mini_groups(m.parameters()), **k),
    "frugal svd": lambda m, **k: mo.FrugalAdamW(_groups(m, density=0.25), **k),
    "frugal block": lambda m, **k: mo.FrugalAdamW(_groups(m, density=0.5, proj="block"), **k),
    "natural galore": lambda m, **k: mo.NaturalGaLoreAdamW(_groups(m, rank=4), **k),
}


def _train(name, dtype, state_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(dtype)
    before = [p.detach().float().clone() for p in model.parameters()]
    kw = {"lr": 1e-3} if state_dtype is None else {"lr": 1e-3, "state_dtype": state_dtype}
    opt = BUILDERS[name](model, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        x = torch.randn(8, 32, generator=gen).to(dtype)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    named = list(model.named_parameters())
    return [(n, p.detach().float(), b) for (n, p), b in zip(named, before, strict=True)]


# fp16 weights with fp16 moments: test_fp16_moments_are_warned_about
COMBOS = [
    (dtype, sd)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for sd in (None, "float32", "int8")
    if not (dtype == torch.float16 and sd is None)
]


@pytest.mark.parametrize(("dtype", "state_dtype"), COMBOS, ids=lambda x: str(x))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_steps_stay_finite_and_bounded(name, dtype, state_dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank clamps on the small layers
        params = _train(name, dtype, state_dtype)
    for pname, p, b in params:
        assert torch.isfinite(p).all(), pname
        moved = (p - b).abs().max().item()
        # 7 steps at lr 1e-3; APOLLO-Mini's sqrt(128) scale makes ~0.08 the most expected
        assert moved < 0.25, (pname, moved)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fp16_moments_are_warned_about(name) -> None:
    _reset_warn_once()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        params = _train(name, torch.float16, None)
    assert any(str(w.message) == FP16_MOMENTS for w in seen)
    for pname, p, _ in params:  # large steps, but nothing overflows in memopt's arithmetic
        assert torch.isfinite(p).all(), pname
