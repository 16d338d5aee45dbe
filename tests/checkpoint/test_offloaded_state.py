"""A snapshot of an optimizer whose state lives on a tier (``StateOffloadedOptimizer``) holds
the real state (read back through ``state_dict()``, not the empty placeholders left between
steps) and resumes exactly."""

from __future__ import annotations

import torch
from torch import nn

import memopt.optim as mo
from memopt.checkpoint import AsyncCheckpointer
from memopt.offload import PinnedCPUTier
from memopt.offload.state_offload import StateOffloadedOptimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))


def _opt(m: nn.Module) -> StateOffloadedOptimizer:
    groups = mo.param_groups(m, target="all-linear", rank=4, update_proj_gap=3)
    return StateOffloadedOptimizer(mo.GaLoreAdamW(groups, lr=1e-2), PinnedCPUTier(), min_bytes=0)


def _run(opt: torch.optim.Optimizer, m: nn.Module, start: int, stop: int) -> None:
    g = torch.Generator().manual_seed(1)
    for s in range(stop):
        x = torch.randn(8, 64, generator=g)
        if s >= start:
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()


def test_offloaded_state_snapshot_resumes_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = _model()
    opt = _opt(m)
    _run(opt, m, 0, 4)
    assert opt.resident_bytes() == 0  # everything on the tier between steps
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(4, model=m, optimizer=opt)
        ckpt.wait()
    _run(opt, m, 4, 8)
    m2 = _model()
    opt2 = _opt(m2)
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.load(model=m2, optimizer=opt2)
    assert opt2.resident_bytes() == 0  # loaded state went back out to the tier
    _run(opt2, m2, 4, 8)
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
