"""``ShardedOptimizer.state_dict`` carries the fp32 masters of ``master_dtype`` (per-parameter
state ``master``) and ``load_state_dict`` takes them back: a bf16 model resumed from its
state dicts trains on bit for bit, whichever of the model and the optimizer is loaded first.
Before, the masters were rebuilt from the bf16 weights (a bf16 ulp off). One process: the
plain path of stage 2, and stage 3 (on one process that path too); the 2-rank and checkpoint
cases are in tests/checkpoint/test_master_resume.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.optim import AdamW


def _make(stage: int = 2) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return memopt.shard(model, opt, stage=stage, layout="dim0", master_dtype=torch.float32)


def _train(model: nn.Module, opt: Any, start: int, end: int) -> None:
    for step in range(start, end):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        nn.functional.mse_loss(model(x.to(torch.bfloat16)).float(), y).backward()
        opt.step()
        opt.zero_grad()


def _masters(opt: Any) -> list[torch.Tensor]:
    return [opt.locals[i].clone() for i in sorted(opt.locals)]


@pytest.mark.parametrize(("stage", "model_first"), [(2, False), (2, True), (3, False)])
def test_state_dict_keeps_the_masters(stage: int, model_first: bool) -> None:
    model, opt = _make(stage)
    _train(model, opt, 0, 3)
    # (torch's state_dict shares the live state tensors, which the next steps change)
    sd, msd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    saved = {i: t.clone() for i, t in opt.locals.items()}
    _train(model, opt, 3, 5)
    again, opt2 = _make(stage)
    if model_first:
        again.load_state_dict(msd)
    opt2.load_state_dict(sd)
    if not model_first:
        again.load_state_dict(msd)
    _train(again, opt2, 3, 5)
    for a, b in zip(again.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_masters(opt2), _masters(opt), strict=True):
        assert torch.equal(a, b)
    for i, st in sd["state"].items():  # (the state dict carries them as fp32 "master")
        assert st["master"].dtype == torch.float32
        assert torch.equal(st["master"], saved[i])


def test_without_masters_rebuilds_and_bad_master_refused() -> None:
    model, opt = _make()
    _train(model, opt, 0, 3)
    sd, msd = opt.state_dict(), model.state_dict()
    old = {**sd, "state": {i: {k: v for k, v in st.items() if k != "master"}
                           for i, st in sd["state"].items()}}  # fmt: skip
    again, opt2 = _make()
    opt2.load_state_dict(old)  # a state dict of before: the masters come from the weights
    again.load_state_dict(msd)
    opt2.step()  # (no gradients: refreshes the masters only)
    for i, (_param, rows) in opt2._master_of.items():
        assert torch.equal(opt2.locals[i], rows.float()), i
    bad = {**sd, "state": dict(sd["state"])}
    bad["state"][0] = {**sd["state"][0], "master": sd["state"][0]["master"][:1]}
    before = [t.clone() for t in _masters(opt2)]
    step = opt2.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(ValueError, match="holds 'master'.*nothing was loaded"):
        opt2.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(_masters(opt2), before, strict=True))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], step)
