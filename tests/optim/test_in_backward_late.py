"""Optimizer-in-backward updates every parameter the ordinary loop (backward x N, then
optimizer.step()) updates, including the ones no hook fires for in a step's last backward:

- a parameter used in an earlier micro-batch of the step but not in the last one (an MoE
  expert, a skipped branch): it was never updated and its .grad grew across all steps;
- a parameter of the optimizer frozen when the hooks were installed and unfrozen later, or
  added with add_param_group: it was never updated, silently.

And a second step_in_backward on an optimizer that already has hooks is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.optim import AdamW, ApolloAdamW, ApolloMini, GaLoreAdamW, step_in_backward

KINDS = ["adamw", "galore", "apollo", "apollo_mini"]
# Whether the branch `b` is used, per step and micro-batch: the last micro-batch skips it
# (steps 0 and 2), no micro-batch uses it (step 1), every one does (step 3).
USES = [[True, False], [False, False], [False, True], [True, True]]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h + self.b(h) if use_b else h)


def _groups(kind: str, params: list[nn.Parameter]) -> list[dict]:
    mats = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() < 2]
    if kind == "adamw":
        return [{"params": params}]
    rank = 1 if kind == "apollo_mini" else 2
    return [{"params": mats, "rank": rank, "update_proj_gap": 2}, {"params": rest}]


def _opt(kind: str, params: list[nn.Parameter]):
    cls = {"adamw": AdamW, "galore": GaLoreAdamW, "apollo": ApolloAdamW, "apollo_mini": ApolloMini}
    return cls[kind](_groups(kind, params), lr=1e-2)


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)


def _backward(net: Net, step: int, micro: int) -> None:
    x, y = _batch(step, micro)
    (net(x, USES[step % 4][micro]) - y).square().mean().backward()


def _ordinary_step(net: Net, opt, step: int, accum: int, max_norm, prev) -> float:
    """backward x accum, clip by the previous step's norm (as in-backward does), step."""
    for mb in range(accum):
        _backward(net, step, mb)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")).item()
    if max_norm is not None and prev is not None:
        for p in net.parameters():
            if p.grad is not None:
                p.grad.mul_(min(1.0, max_norm / (prev + 1e-6)))
    opt.step()
    opt.zero_grad()
    return norm


def _same(a: Net, b: Net, exact: bool) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_param_missing_from_last_micro_batch_is_updated(kind: str, max_norm) -> None:
    accum, steps = 2, 6
    ref, net = Net(), Net()
    ref_opt, opt = _opt(kind, list(ref.parameters())), _opt(kind, list(net.parameters()))
    hooks = step_in_backward(net, opt, accumulation_steps=accum, max_grad_norm=max_norm)
    prev = None
    for s in range(steps):
        prev = _ordinary_step(ref, ref_opt, s, accum, max_norm, prev)
        for mb in range(accum):
            _backward(net, s, mb)
        _same(ref, net, exact=max_norm is None)  # clipped: the norm sums in another order
        assert hooks.last_grad_norm == pytest.approx(prev, rel=1e-5)  # b counted too
        # no gradient is left over after the step (b's used to grow across every step)
        assert all(p.grad is None for p in net.parameters())
    assert not torch.equal(Net().b.weight, net.b.weight)  # b did train
    assert opt.state[net.b.weight]["step"] == ref_opt.state[ref.b.weight]["step"] == 4
    hooks.remove()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("unfreeze_at", [(3, 0), (3, 1)])  # before micro-batch 0 or 1
def test_layer_unfrozen_later_is_trained(kind: str, unfreeze_at: tuple[int, int]) -> None:
    """The optimizer holds the frozen layer (torch's usual AdamW(model.parameters()))."""
    accum, steps = 2, 5
    ref, net = Net(), Net()
    for m in (ref, net):
        m.b.requires_grad_(False)
    ref_opt, opt = _opt(kind, list(ref.parameters())), _opt(kind, list(net.parameters()))
    hooks = step_in_backward(net, opt, accumulation_steps=accum)
    assert not net.b.weight._post_accumulate_grad_hooks
    for s in range(steps):
        for mb in range(accum):
            if (s, mb) == unfreeze_at:
                ref.b.requires_grad_(True)
                net.b.requires_grad_(True)
            _backward(ref, s, mb)
            _backward(net, s, mb)
        ref_opt.step()
        ref_opt.zero_grad()
        _same(ref, net, exact=True)
        assert all(p.grad is None for p in net.parameters())
    assert opt.state[net.b.weight]["step"] == 2  # steps 3 and 4 (4: not via its hook)
    assert len(net.b.weight._post_accumulate_grad_hooks) == 1  # hooked from its first step
    hooks.remove()
    assert all(not p._post_accumulate_grad_hooks for p in net.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_layer_added_with_add_param_group_is_trained(kind: str) -> None:
    """The documented path: the optimizer was built without the frozen layer; unfreeze it
    and add_param_group it (a low-rank group of its own for the projecting optimizers)."""
    accum, steps = 2, 5
    ref, net = Net(), Net()
    opts = []
    for m in (ref, net):
        m.b.requires_grad_(False)
        opts.append(_opt(kind, [p for p in m.parameters() if p.requires_grad]))
    ref_opt, opt = opts
    hooks = step_in_backward(net, opt, accumulation_steps=accum)
    for s in range(steps):
        if s == 2:
            for m, o in ((ref, ref_opt), (net, opt)):
                m.b.requires_grad_(True)
                for group in _groups(kind, list(m.b.parameters())):
                    o.add_param_group(group)
        _ordinary_step(ref, ref_opt, s, accum, None, None)
        for mb in range(accum):
            _backward(net, s, mb)
        _same(ref, net, exact=True)
        assert all(p.grad is None for p in net.parameters())
    assert not torch.equal(Net().b.weight, net.b.weight)
    hooks.remove()


def test_second_step_in_backward_on_the_same_optimizer_is_refused() -> None:
    net = Net()
    opt = AdamW(net.parameters(), lr=1e-2)
    hooks = step_in_backward(net, opt)
    with pytest.raises(ValueError, match=r"already has optimizer-in-backward hooks.*remove\(\)"):
        step_in_backward(net, opt, accumulation_steps=2)
    # nothing more was installed: one hook per parameter, and the first handle still works
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in net.parameters())
    w0 = net.a.weight.detach().clone()
    _backward(net, 0, 0)
    assert not torch.equal(w0, net.a.weight) and net.a.weight.grad is None
    hooks.remove()
    again = step_in_backward(net, opt)  # accepted once the first handle is removed
    again.remove()


def test_an_error_in_a_hook_does_not_wedge_the_next_backward() -> None:
    """The engine drops the queued end-of-backward callback when a hook raises; the handle
    used to keep that backward's bookkeeping, so every later backward was refused with the
    same 'second gradient' error (and none was ever counted)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block, head = nn.Linear(8, 8), nn.Linear(8, 1)
    params = [*block.parameters(), *head.parameters()]
    opt = AdamW(params, lr=1e-2)
    hooks = step_in_backward(params, opt)
    x = torch.randn(4, 8, requires_grad=True)  # (reentrant checkpointing needs one)
    for _ in range(2):
        x = x + checkpoint(block, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="reentrant"):
        head(x).square().mean().backward()
    opt.zero_grad()
    # the user fixes the model (non-reentrant checkpointing) and goes on with the same handle
    x = torch.randn(4, 8)
    for _ in range(2):
        x = x + checkpoint(block, x, use_reentrant=False)
    loss = head(x).square().mean()
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    expected = sum(g.square().sum() for g in grads).sqrt().item()
    w0 = block.weight.detach().clone()
    loss.backward()
    assert not torch.equal(w0, block.weight) and block.weight.grad is None
    assert (hooks.steps, hooks.micro_step) == (1, 1)
    assert hooks.last_grad_norm == pytest.approx(expected, rel=1e-5)
    hooks.remove()
