"""Optimizer-in-backward with gradient accumulation: a save between micro-batches is refused.

A snapshot holds no gradients. Saved after micro-batch 1 of 2, the hooks' state restored the
micro-batch counter but not the gradient accumulated in ``.grad``, so the resumed run took its
next update on micro-batch 2's gradient alone (counted as a full step: norm, clipping,
scheduler), silently 1e-2 off the uninterrupted run. ``StepInBackward.state_dict`` now refuses
between micro-batches, before anything is written: ``AsyncCheckpointer.save(...,
extra={"hooks": hooks.state_dict()})`` and ``Setup.save`` leave no snapshot and save again at
the next step boundary, which resumes exactly as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import memopt
from memopt import Config
from memopt.checkpoint import AsyncCheckpointer
from memopt.optim import AdamW, StepInBackward, step_in_backward

ACC = 2


def _midway(step: int, micro_step: int) -> str:
    return (
        rf"between micro-batches: 1 of the {ACC} micro-batches of step {step} have run "
        rf"\(micro_step={micro_step}\).*Save at a step boundary.*accumulation_steps={ACC}"
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _micro(model: nn.Module, i: int) -> None:
    """Forward and backward of micro-batch ``i`` (the update runs inside the backward)."""
    g = torch.Generator().manual_seed(50 + i)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
    nn.functional.mse_loss(model(x), y).backward()


def _fresh() -> tuple[nn.Module, AdamW, StepInBackward]:
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    return model, opt, step_in_backward(model, opt, accumulation_steps=ACC, max_grad_norm=0.5)


def test_hand_loop_save_between_micro_batches_is_refused(tmp_path: Path) -> None:
    model, opt, hooks = _fresh()
    for i in range(3):  # step 1, then the first micro-batch of step 2
        _micro(model, i)
    with AsyncCheckpointer(tmp_path) as ckpt:
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(ValueError, match=_midway(2, 3)):
            ckpt.save(3, model=model, optimizer=opt, extra={"hooks": hooks.state_dict()})
        assert ckpt.steps() == [] and sorted(os.listdir(tmp_path)) == before
        assert hooks.micro_step == 3 and hooks.steps == 1  # (the refusal changed nothing)
        _micro(model, 3)  # the step's last micro-batch: a step boundary
        ckpt.save(4, model=model, optimizer=opt, extra={"hooks": hooks.state_dict()})
        ckpt.wait()
        assert ckpt.steps() == [4]
    for i in range(4, 8):
        _micro(model, i)
    model2, opt2, hooks2 = _fresh()
    with AsyncCheckpointer(tmp_path) as ckpt:
        extra = ckpt.load(model=model2, optimizer=opt2)
    hooks2.load_state_dict(extra["hooks"])
    for i in range(4, 8):
        _micro(model2, i)
    assert (hooks2.steps, hooks2.micro_step) == (hooks.steps, hooks.micro_step) == (4, 8)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_setup_save_between_micro_batches_is_refused(tmp_path: Path) -> None:
    cfg = Config.from_dict({
        "model": {"device": "cpu"},
        "train": {"grad_accum": ACC},
        "optimizer": {"in_backward": True, "max_grad_norm": 0.5},
        "checkpoint": {"directory": str(tmp_path), "fsync": False},
    })  # fmt: skip
    s = memopt.setup(_model(), cfg, resume=False)
    assert s.checkpointer is not None and s.in_backward is not None
    _micro(s.model, 0)
    with pytest.raises(ValueError, match=_midway(1, 1)):
        s.save(1)
    assert s.checkpointer.steps() == []
    _micro(s.model, 1)
    s.save(1)
    s.checkpointer.wait()
    assert s.checkpointer.steps() == [1]
    s.close()
    again = memopt.setup(_model(), cfg)
    assert again.resumed_from == 1 and again.in_backward.micro_step == ACC
    again.close()
