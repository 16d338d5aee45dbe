"""``step_in_backward`` on several ranks: refused (sweep 40). Under a plain HF ``Trainer`` on
``torchrun`` (DDP), each rank's hooks updated the parameters from that rank's local gradient
before DDP's all-reduce, so the two ranks' models drifted apart (0.0236 after 4 steps)
without an error; ``memopt.shard`` / ``memopt.setup`` refused it, a bare
``step_in_backward`` did not."""

from __future__ import annotations

import pytest
import torch

from memopt.optim import AdamW, step_in_backward
from tests._harness.dist import run_distributed


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _install_on_two_ranks(rank: int, world: int) -> str:
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="runs 2 ranks here, but optimizer-in-backward is "
                                         "single-process") as info:  # fmt: skip
        step_in_backward(model, opt)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert not opt._memopt_in_backward
    # DDP-wrapped, as the HF Trainer does: the same refusal
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match="runs 2 ranks"):
        step_in_backward(ddp, opt)
    return str(info.value)


def test_refused_on_two_ranks() -> None:
    messages = run_distributed(_install_on_two_ranks, world_size=2, timeout_s=60)
    assert all("call optimizer.step() after backward()" in m for m in messages)


def test_refused_in_backward_when_ranks_appear_after_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # hooks installed in one process, a process group of 2 set up afterwards: the first hook
    # of the next backward refuses before anything is updated, and the handle is not wedged
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    hooks = step_in_backward(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 8)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="runs 2 ranks"):
        model(x).square().mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    monkeypatch.undo()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()  # one process again: it trains
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert hooks.steps == 1
    hooks.remove()
