"""``step_in_backward(accumulation_steps=N)`` over epochs whose micro-batch count is not a
multiple of N: ``finish_window()`` steps the partial window and realigns the counter.

Before it existed the only way to end such a window was ``optimizer.step()``, which updated
but left the hooks' counter mid-window: every later window straddled two of the user's
(0.012 off the ordinary loop after one more epoch) and ``state_dict()`` refused at every
step boundary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.optim import AdamW, step_in_backward

WINDOWS = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10]]  # epoch 1: 8 micro-batches, N=3; epoch 2
N = 3
CLIP = 0.5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _loss(model: nn.Module, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(micro)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
    return (model(x) - y).square().mean() / N


def _reference() -> tuple[nn.Module, list[float]]:
    """The ordinary loop, clipped by the previous window's global norm (as in-backward)."""
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    prev, norms = None, []
    for window in WINDOWS:
        for micro in window:
            _loss(model, micro).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        if prev is not None:
            coef = min(1.0, CLIP / (prev + 1e-6))
            for p in model.parameters():
                p.grad.mul_(coef)
        prev = norm
        norms.append(norm)
        opt.step()
        opt.zero_grad()
    return model, norms


def test_finish_window_matches_the_ordinary_loop() -> None:
    ref, ref_norms = _reference()
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    hooks = step_in_backward(model, opt, accumulation_steps=N, max_grad_norm=CLIP)
    steps_seen = []
    opt.register_step_post_hook(lambda *_: steps_seen.append(hooks.micro_step))
    norms, saved = [], []
    for window in WINDOWS:
        for micro in window:
            _loss(model, micro).backward()
        if len(window) < N:
            assert hooks.finish_window() is True
        else:
            assert hooks.finish_window() is False  # a window boundary: nothing to do
        norms.append(hooks.last_grad_norm)
        saved.append(hooks.state_dict())  # at every step boundary of the user's loop
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert [s["micro_step"] for s in saved] == [3, 6, 9, 12]
    assert [s["steps"] for s in saved] == [1, 2, 3, 4]
    assert len(steps_seen) == 4  # the optimizer's post-hooks ran once per window
    assert all(p.grad is None for p in model.parameters())


def test_finish_window_inside_backward_is_refused() -> None:
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    hooks = step_in_backward(model, opt, accumulation_steps=N)
    errors = []

    def hook(_: torch.Tensor) -> None:
        try:
            hooks.finish_window()
        except RuntimeError as exc:
            errors.append(str(exc))

    model[0].weight.register_post_accumulate_grad_hook(hook)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, 0).backward()
    assert errors and "after loss.backward() returned" in errors[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert hooks.finish_window() is True  # afterwards it steps the one-micro-batch window
    assert hooks.micro_step == N


def test_grad_scaler_is_refused_clearly() -> None:
    """``scaler.step`` used to end in torch's bare "No inf checks were recorded for this
    optimizer"; it now names step_in_backward, the scaled updates and bf16."""
    import copy

    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    hooks = step_in_backward(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_loss(model, 0)).backward()
    with pytest.raises(NotImplementedError, match=r"step_in_backward .*GradScaler.*bfloat16"):
        scaler.step(opt)
    assert not any(a in vars(opt) for a in ("grad_scale", "found_inf"))
    assert not getattr(copy.deepcopy(opt), "_step_supports_amp_scaling", False)  # no hooks there
    hooks.remove()  # the plain loop works again, GradScaler's own unscale/skip included
    assert not getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_loss(model, 1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
