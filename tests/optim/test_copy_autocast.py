"""Two things training loops do around an optimizer: copy it (deepcopy, pickle) and call its
step inside ``torch.autocast``. A copy used to lose memopt's own settings (the seed, APOLLO's
options) and crash on its first step; under autocast the projection GEMMs ran in low
precision and made fp16 moments for fp32 weights (GaLore 9x, FRUGAL 145x too far)."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from tests.optim.test_param_dtypes import BUILDERS


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))


def _grads(model: nn.Module, seed: int) -> None:
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_copies_step_like_the_original(name: str) -> None:
    warnings.simplefilter("ignore")
    model = _model()
    opt = BUILDERS[name](model, lr=1e-3)
    for s in range(4):  # past a refresh (gap 3)
        _grads(model, s)
        opt.step()
    buf = io.BytesIO()
    pickle.dump(opt, buf)
    copies = [copy.deepcopy(opt), pickle.loads(buf.getvalue())]
    _grads(model, 9)
    for other in copies:
        for p, q in zip(_params(opt), _params(other), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
    opt.step()
    for other in copies:
        other.step()
        for p, q in zip(_params(opt), _params(other), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["galore svd", "apollo", "frugal svd", "natural galore"])
@pytest.mark.parametrize("state_dtype", [None, "float32"])
def test_step_inside_autocast_equals_outside(name: str, state_dtype: str | None) -> None:
    warnings.simplefilter("ignore")
    kw = {"lr": 1e-3} if state_dtype is None else {"lr": 1e-3, "state_dtype": state_dtype}
    out = []
    for inside in (False, True):
        model = _model()
        opt = BUILDERS[name](model, **kw)
        for s in range(4):
            _grads(model, s)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
        moments = [v for st in opt.state.values() for k, v in st.items() if k == "exp_avg"]
        assert moments and all(m.dtype == torch.float32 for m in moments)
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)
