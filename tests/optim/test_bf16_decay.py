"""Decoupled weight decay reaches bf16 parameters on every optimizer path.

At lr 1e-2, wd 0.1 the decay per step (1e-3 relative) is below half a bf16 ulp (2^-9
relative at least). Applied as its own multiply on the bf16 tensor it rounds straight back
to W, and it did on the APOLLO / APOLLO-Mini CPU path, in FRUGAL, in GaLore / Natural
GaLore with ``state_dtype="float32"`` and in the full-state groups with bf16 moments: the
decayed run ended with exactly the norm of the undecayed one. Summed with the update in fp32
and rounded once (as ``memopt.optim.AdamW`` always did), it survives, because the update
dithers the rounding: the norm then shrinks against an undecayed run by what it does in fp32.
The updates are sized to lie well above bf16's resolution; an update that is itself below it
is lost with its decay, as in torch (docs/optim.md, "bf16 parameters").
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import memopt.optim as mo

STEPS, LR, WD = 50, 1e-2, 0.1
SHAPE = (64, 48)
LOW = dict(rank=8, update_proj_gap=20)

F32 = {"state_dtype": "float32"}
SGD = {"inactive_update_rule": "sgd"}


def _case(
    cls: Any,
    group: dict[str, Any],
    kw: dict[str, Any] | None = None,
    *,
    gscale: float = 1e-2,
    share: float = 1.0,
) -> tuple[Any, ...]:
    """(optimizer, group keys, optimizer keys, gradient scale, share of fp32's shrink)."""
    return cls, group, kw or {}, gscale, share


CASES: dict[str, tuple[Any, ...]] = {
    "apollo": _case(mo.ApolloAdamW, LOW),
    "apollo fp32 state": _case(mo.ApolloAdamW, LOW, F32),
    "apollo-mini": _case(mo.ApolloMini, dict(LOW, rank=1)),
    "galore fp32 state": _case(mo.GaLoreAdamW, dict(LOW, scale=1.0), F32),
    "natural galore fp32 state": _case(mo.NaturalGaLoreAdamW, dict(LOW, scale=1.0), F32),
    "galore coordinate": _case(
        mo.GaLoreAdamW, dict(density=1.0, update_proj_gap=20, scale=1.0, proj="coordinate")
    ),
    # only the 8 selected columns of 48 get an update: the rest keep W (and lose the decay)
    "galore columns": _case(mo.GaLoreAdamW, dict(LOW, scale=1.0, proj="columns"), share=8 / 48),
    "frugal sgd": _case(mo.FrugalAdamW, dict(density=0.25, update_proj_gap=20, **SGD)),
    "frugal sign fp32 state": _case(mo.FrugalAdamW, dict(density=0.25, update_proj_gap=20), F32),
    # two tensors, one active at a time; the inactive one's SGD step needs gradients ~1
    "frugal block": _case(
        mo.FrugalAdamW, dict(density=0.5, update_proj_gap=20, proj="block", **SGD), gscale=1.0
    ),
    "frugal state-free": _case(mo.FrugalAdamW, dict(state_free=True, **SGD), gscale=1.0),
    "galore full-state group": _case(mo.GaLoreAdamW, {}),
    "apollo full-state group": _case(mo.ApolloAdamW, {}),
    "galore full-state, no bias correction": _case(mo.GaLoreAdamW, {"correct_bias": False}),
    "adamw": _case(mo.AdamW, {}),
}


def _norm(case: str, dtype: torch.dtype, wd: float) -> float:
    cls, group, kw, gscale, _ = CASES[case]
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(SHAPE).div(8).to(dtype)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (full-rank column selections warn once)
        opt = cls([{"params": ws, "weight_decay": wd, **group}], lr=LR, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            for w in ws:
                w.grad = torch.randn(SHAPE, generator=gen).mul(gscale).to(dtype)
            opt.step()
    return float(torch.stack([w.detach().float().norm() for w in ws]).norm())


def _shrink(case: str, dtype: torch.dtype) -> float:
    """How much smaller the decayed weights end than the undecayed ones (same gradients)."""
    return 1.0 - _norm(case, dtype, WD) / _norm(case, dtype, 0.0)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_weights_decay_as_fp32_ones(case: str) -> None:
    share = CASES[case][4]
    fp32, bf16 = _shrink(case, torch.float32), _shrink(case, torch.bfloat16)
    assert fp32 > 0.03  # (the decay alone: 1 - 0.999^50 = 0.049)
    assert 0.75 * share * fp32 < bf16 < 1.25 * share * fp32, (
        f"{case}: bf16 weights shrank by {bf16:.5f} against an undecayed run, fp32 ones by "
        f"{fp32:.5f}: the decay did not reach the bf16 weights as it should"
    )


def test_galore_form_decay_is_one_rounding() -> None:
    """A full-state group with galore's eps (decay after the update) on bf16 weights and
    moments: torch's fused kernel takes the decay (lr' = lr (1 - lr wd), wd' = wd / (1 - lr
    wd)), so W ends where (1 - lr wd) (W - s d), computed in fp32 and rounded once, says."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(SHAPE).div(8).bfloat16())
    w0 = w.detach().float()
    g = torch.randn(SHAPE).mul(1e-2).bfloat16()
    w.grad = g.clone()
    mo.GaLoreAdamW([{"params": [w], "weight_decay": WD}], lr=LR).step()
    b1, b2, eps = 0.9, 0.999, 1e-6  # GaLoreAdamW's defaults
    m, v = (1 - b1) * g.float(), (1 - b2) * g.float().square()
    step_size = LR * (1 - b2) ** 0.5 / (1 - b1)
    want = ((w0 - step_size * m / (v.sqrt() + eps)) * (1 - LR * WD)).bfloat16()
    moved = w.detach() != w0.bfloat16()
    assert moved.any()
    # the kernel's fp32 scalars round a little differently: at most a rare 1-ulp tie
    assert (w.detach() == want).float().mean() > 0.99
