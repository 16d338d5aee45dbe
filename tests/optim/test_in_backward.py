"""Optimizer-in-backward equals the ordinary loop, with accumulation, clipping, schedulers
and resume (the cases the reference per-layer modes get wrong)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from memopt.optim import AdamW, GaLoreAdamW, step_in_backward


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)
    )


def _make_opt(kind, model):
    if kind == "adamw":
        return AdamW(model.parameters(), lr=1e-2)
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return GaLoreAdamW(
        [{"params": mats, "rank": 4, "update_proj_gap": 3}, {"params": rest}], lr=1e-2
    )


def _batch(step, micro):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)


def _loss(model, x, y):
    return (model(x) - y).square().mean()


def _reference(kind, steps, accum, max_norm=None, sched=False):
    """The ordinary loop; clipping by the previous step's global norm, like in-backward."""
    model = _model()
    opt = _make_opt(kind, model)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)) if sched else None
    prev, norms = None, []
    for s in range(steps):
        for mb in range(accum):
            _loss(model, *_batch(s, mb)).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        if max_norm is not None and prev is not None:
            coef = min(1.0, max_norm / (prev + 1e-6))
            for p in model.parameters():
                p.grad.mul_(coef)
        prev = norm
        norms.append(norm)
        opt.step()
        opt.zero_grad()
        if lr_sched:
            lr_sched.step()
    return model, norms


def _in_backward(
    kind, steps, accum, max_norm=None, sched=False, model=None, opt=None, start=0, handle_state=None
):
    model = model or _model()
    opt = opt or _make_opt(kind, model)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)) if sched else None
    handle = step_in_backward(model, opt, accumulation_steps=accum, max_grad_norm=max_norm)
    if handle_state:
        handle.load_state_dict(handle_state)
    norms = []
    for s in range(start, start + steps):
        for mb in range(accum):
            _loss(model, *_batch(s, mb)).backward()
            last = mb == accum - 1
            grads_alive = [p.grad is not None for p in model.parameters()]
            assert all(grads_alive) != last  # accumulating, or freed after the update
        norms.append(handle.last_grad_norm)
        opt.step()  # harmless: gradients are gone
        opt.zero_grad()
        if lr_sched:
            lr_sched.step()
    handle.remove()
    return model, opt, handle, norms


@pytest.mark.parametrize("kind", ["adamw", "galore"])
@pytest.mark.parametrize("accum", [1, 3])
def test_equals_ordinary_loop(kind, accum):
    ref, _ = _reference(kind, 6, accum)
    got, *_ = _in_backward(kind, 6, accum)
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_clipping_by_previous_norm_and_true_norm_reported():
    ref, ref_norms = _reference("adamw", 5, 2, max_norm=0.05)
    got, _, _, norms = _in_backward("adamw", 5, 2, max_norm=0.05)
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # reported norms are the unclipped global norms of each step (HF's layer-wise logs 0.0)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert max(ref_norms) > 0.05  # so the clip really acted


def test_lr_scheduler_is_respected():
    ref, _ = _reference("galore", 5, 1, sched=True)
    got, *_ = _in_backward("galore", 5, 1, sched=True)
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_resume_mid_run_is_exact():
    full, *_ = _in_backward("galore", 6, 2, max_norm=0.05)
    model, opt, handle, _ = _in_backward("galore", 3, 2, max_norm=0.05)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "hook": handle.state_dict()}, buf
    )
    buf.seek(0)
    blob = torch.load(buf, weights_only=True)
    model2 = _model()
    model2.load_state_dict(blob["model"])
    opt2 = _make_opt("galore", model2)
    opt2.load_state_dict(blob["opt"])
    got, *_ = _in_backward(
        "galore", 3, 2, max_norm=0.05, model=model2, opt=opt2, start=3, handle_state=blob["hook"]
    )
    for a, b in zip(full.parameters(), got.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_input():
    model = _model()
    with pytest.raises(TypeError, match="memopt optimizer"):
        step_in_backward(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="not in the optimizer"):
        step_in_backward(model, AdamW(list(model.parameters())[:2]))
    with pytest.raises(ValueError, match="accumulation_steps"):
        step_in_backward(model, AdamW(model.parameters()), accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number"):
        step_in_backward(model, AdamW(model.parameters()), max_grad_norm=float("nan"))
    # a generator the optimizer consumed is empty: no hook, and the model never trained
    params = model.parameters()
    opt = AdamW(params)
    with pytest.raises(ValueError, match="no trainable parameters given"):
        step_in_backward(params, opt)
    with pytest.raises(ValueError, match=r"2 trainable parameter\(s\) of the optimizer are not"):
        step_in_backward(list(model.parameters())[2:], opt)


def test_step_pre_hooks_run_once_per_step_before_any_update() -> None:
    """optimizer.step() is never called, so the step pre-hooks (an AsyncCheckpointer's fence)
    run when the first parameter of a step is about to change, once per step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    opt = AdamW(model.parameters(), lr=1e-2)
    seen: list[list[torch.Tensor]] = []
    posts: list[int] = []
    opt.register_step_post_hook(lambda *_: posts.append(len(seen)))
    opt.register_step_pre_hook(
        lambda *_: seen.append([p.detach().clone() for p in model.parameters()])
    )
    handle = step_in_backward(model, opt, accumulation_steps=2)
    for i in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(4, 8)).square().mean().backward()
        if i % 2 == 0:  # first micro-batch: no step, no hook
            assert len(seen) == i // 2
        else:
            assert len(seen) == i // 2 + 1
            assert all(torch.equal(a, b) for a, b in zip(seen[-1], before, strict=True))
            assert not all(
                torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
            )
    assert posts == [1, 2]  # once per step, after its pre-hook
    handle.remove()


def test_module_used_twice_under_reentrant_checkpoint_is_an_error() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    opt = AdamW([*block.parameters(), *head.parameters()], lr=1e-2)
    step_in_backward([*block.parameters(), *head.parameters()], opt)
    x = torch.randn(4, 8, requires_grad=True)
    for _ in range(2):
        x = x + checkpoint(block, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="reentrant"):
        head(x).square().mean().backward()


def test_sharding_an_optimizer_stepped_in_backward_is_refused() -> None:
    """Each update would use the local gradient before any reduction, and an offload tier
    would never be used: memopt.shard refuses it (until the handle is removed)."""
    import memopt

    model = torch.nn.Linear(8, 8)
    opt = AdamW(model.parameters(), lr=1e-2)
    handle = step_in_backward(model, opt)
    with pytest.raises(ValueError, match="step_in_backward"):
        memopt.shard(model, opt, stage=1, offload="cpu")
    handle.remove()
    memopt.shard(model, opt, stage=1)  # fine once the hooks are gone


@pytest.mark.parametrize("offload", [None, "cpu"])
def test_stepping_a_sharded_optimizer_in_backward_is_refused(offload) -> None:
    """The other order: step_in_backward given the optimizer memopt.shard now drives. It was
    accepted, and with 2 ranks each rank stepped on its own gradient (the ranks drifted)."""
    import memopt

    model = torch.nn.Linear(8, 8)
    opt = AdamW(model.parameters(), lr=1e-2)
    memopt.shard(model, opt, stage=1, offload=offload)
    with pytest.raises(ValueError, match="driven by a ShardedOptimizer.*do not combine"):
        step_in_backward(model, opt)
