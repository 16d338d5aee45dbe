"""WTA-CRS sampled linear layers: exact forward, unbiased weight gradient, fewer saved bytes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memopt.activations._crs import crs_weight_grad, row_importance, sample_budget, wta_sample
from memopt.activations.policy import keep, sample
from memopt.activations.sampled import (
    SampledLinear,
    SampleState,
    install_sampled,
    sampled_linear,
    sampled_saved_bytes,
)


def _skewed(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows with heavy-tailed norms (a few tokens dominate, as in real activations)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    scale = torch.exp(2.0 * torch.randn(n, 1, generator=gen))
    return x * scale


def _draws(x: torch.Tensor, g: torch.Tensor, p: torch.Tensor, k: int, trials: int, *,
           wta: bool, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(trials):
        idx, w = wta_sample(p, k, gen, wta=wta)
        out.append(crs_weight_grad(g, x.index_select(0, idx), idx, w))
    return torch.stack(out).double()


def _max_z(est: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest per-entry |mean - exact| in standard errors (entries with no spread: exact)."""
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    still = se < 1e-9
    assert torch.allclose(mean[still], exact.double()[still], atol=1e-6)
    return float(((mean - exact.double()).abs()[~still] / se[~still]).max())


@pytest.mark.parametrize("wta", [True, False])
@pytest.mark.parametrize("use_proxy", [False, True])
def test_estimator_is_unbiased(wta: bool, use_proxy: bool) -> None:
    x, g = _skewed(64, 12, 0), torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    proxy = g.norm(dim=1) * torch.rand(64, generator=torch.Generator().manual_seed(2))
    p = row_importance(x, proxy if use_proxy else None)
    exact = g.t() @ x
    est = _draws(x, g, p, k=16, trials=2000, wta=wta)
    # 72 entries: P(max |z| > 4.5) under the null is ~5e-4.
    assert _max_z(est, exact) < 4.5
    # Frobenius error of the running mean shrinks like 1/sqrt(trials).
    err = [float((est[:t].mean(0) - exact).norm()) for t in (20, 2000)]
    assert err[1] < err[0] / 3


def test_wta_has_lower_variance_than_crs_on_skewed_rows() -> None:
    x, g = _skewed(128, 16, 3), torch.randn(128, 8, generator=torch.Generator().manual_seed(4))
    p, exact = row_importance(x), (g.t() @ x).double()
    var = {}
    for wta in (True, False):
        est = _draws(x, g, p, k=32, trials=1000, wta=wta, seed=5)
        var[wta] = float(((est - exact) ** 2).sum((1, 2)).mean())
    assert var[True] < 0.5 * var[False], var


def test_wta_takes_heavy_rows_deterministically() -> None:
    p = torch.tensor([0.5, 0.3] + [0.2 / 18] * 18)
    idx, w = wta_sample(p, 5, torch.Generator().manual_seed(0))
    assert idx[:2].tolist() == [0, 1] and w[:2].tolist() == [1.0, 1.0]
    assert not set(idx[2:].tolist()) & {0, 1}
    assert torch.allclose(w[2:], torch.full((3,), 18 / 3))  # 1 / (q_i * s), q uniform on 18
    with pytest.raises(ValueError, match="0 < k < N"):
        wta_sample(p, 20)


def test_budget() -> None:
    assert sample_budget(100, 0.3) == 30 and sample_budget(10, 0.01) == 1
    assert sample_budget(7, 1.0) == 7
    with pytest.raises(ValueError, match="ratio"):
        sample_budget(10, 0.0)


def test_forward_and_input_grads_match_linear_3d() -> None:
    torch.manual_seed(0)
    ref = nn.Linear(16, 8)
    lin = SampledLinear.from_linear(ref, ratio=0.25)
    x = torch.randn(3, 10, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = lin(x), ref(x2)
    assert torch.equal(y, y_ref)
    gy = torch.randn_like(y)
    y.backward(gy)
    w_grad_sampled = ref.weight.grad.clone()
    b_grad_sampled = ref.bias.grad.clone()
    ref.zero_grad()
    y_ref.backward(gy)
    assert x.grad is not None and x2.grad is not None
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(b_grad_sampled, ref.bias.grad, rtol=0, atol=1e-5)
    assert not torch.allclose(w_grad_sampled, ref.weight.grad)  # it is a sample


def test_layer_grad_unbiased_through_autograd() -> None:
    torch.manual_seed(0)
    lin = SampledLinear(12, 5, ratio=0.25, seed=7)
    x = _skewed(2 * 24, 12, 9).reshape(2, 24, 12)
    gy = torch.randn(2, 24, 5)
    exact = gy.reshape(-1, 5).t() @ x.reshape(-1, 12)
    lin.sample_state.use_grad_norm = False  # p fixed across trials
    est = []
    for _ in range(1000):
        lin.weight.grad = None
        lin(x).backward(gy)
        est.append(lin.weight.grad.clone())
    assert _max_z(torch.stack(est).double(), exact) < 4.5


def test_full_ratio_is_exact_and_seed_reproducible() -> None:
    torch.manual_seed(0)
    ref = nn.Linear(8, 4)
    x, gy = torch.randn(20, 8), torch.randn(20, 4)
    full = SampledLinear.from_linear(ref, ratio=1.0)
    full(x).backward(gy)
    torch.testing.assert_close(ref.weight.grad, gy.t() @ x)
    grads = []
    for seed in (1, 1, 2):
        ref.weight.grad = None
        SampledLinear.from_linear(ref, ratio=0.3, seed=seed)(x).backward(gy)
        grads.append(ref.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])


def test_previous_grad_norm_feeds_next_sample() -> None:
    lin = SampledLinear(8, 4, ratio=0.5)
    x = torch.randn(2, 6, 8)
    lin(x).sum().backward()
    h = lin.sample_state.prev_grad_norm
    assert h is not None and h.shape == (12,)
    assert lin.sample_state.grad_proxy(12) is h and lin.sample_state.grad_proxy(11) is None


def _saved_bytes(fn, *args) -> int:  # type: ignore[no-untyped-def]
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(t, nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.sum().backward()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_drop_by_ratio(dtype: torch.dtype) -> None:
    ref = nn.Linear(64, 32).to(dtype)
    lin = SampledLinear.from_linear(ref, ratio=0.25)
    x = torch.randn(4, 128, 64, dtype=dtype)
    full, sampled = _saved_bytes(ref, x), _saved_bytes(lin, x)
    assert full == 4 * 128 * 64 * x.element_size()
    assert sampled == sampled_saved_bytes(64, 4 * 128, 0.25, dtype)
    assert sampled / full < 0.25 + 12 / (64 * x.element_size()) + 1e-9
    assert ref.weight.grad is not None and ref.weight.grad.dtype == dtype


def test_install_patches_linears_and_remove_restores() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(2, 32, 8)
    y_plain = block(x)
    handle = install_sampled(block, sample(0.25))
    assert set(handle.layers) == {"0", "2"}
    assert torch.equal(block(x), y_plain)
    with pytest.raises(ValueError, match="already sampled"):
        install_sampled(block, sample(0.5))
    assert "forward" in block[0].__dict__  # the failed second install undid nothing of ours
    handle.remove()
    assert "forward" not in block[0].__dict__ and not hasattr(block[0], "_memopt_sample_state")
    assert torch.equal(block(x), y_plain)
    with pytest.raises(ValueError, match="no nn.Linear"):
        install_sampled(nn.GELU(), sample(0.5))
    with pytest.raises(ValueError, match="action='sample'"):
        install_sampled(block, keep())


def test_installed_block_saves_fewer_bytes_and_eval_is_plain() -> None:
    block = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(4, 64, 32)
    before = _saved_bytes(block, x)
    handle = install_sampled(block, sample(0.2))
    after = _saved_bytes(block, x)
    assert after < 0.7 * before  # ReLU keeps its full output; both linears keep 20%
    block.eval()
    state = handle.states["0"]
    state.prev_grad_norm = None
    with torch.no_grad():
        block(x)
    assert state.prev_grad_norm is None
    handle.remove()


def test_bad_input_shape() -> None:
    st = SampleState(ratio=0.5)
    w = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="in_features=8"):
        sampled_linear(torch.randn(3, 7), w, None, st)
    with pytest.raises(ValueError, match="ratio"):
        SampleState(ratio=1.5)


def _train(sampled: bool, steps: int = 150) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 1))
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    if sampled:
        install_sampled(model, sample(0.3), seed=11)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 32, 16, generator=gen)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], sum(losses[-10:]) / 10


def test_short_convergence_close_to_exact() -> None:
    first, exact = _train(sampled=False)
    _, sampled_loss = _train(sampled=True)
    assert exact < 0.2 * first
    assert sampled_loss < 0.3 * first and sampled_loss < 2.0 * exact, (first, exact, sampled_loss)


def test_apply_sample_policy_counts_the_sample_in_the_ledger() -> None:
    from memopt.activations.apply import apply

    model = nn.Sequential(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)))
    x = torch.randn(4, 64, 32, requires_grad=True)
    held = {}
    for name, policy in (("keep", keep()), ("sample", sample(0.25))):
        with apply(model, {"0": policy}) as mgr:
            out = model(x)
            held[name] = mgr.ledger.current("device")
            out.sum().backward()
            assert mgr.ledger.current("device") == 0
        assert "forward" not in model[0][0].__dict__
    rows = 4 * 64
    relu_out = rows * 64 * 4
    expected = sampled_saved_bytes(32, rows, 0.25) + sampled_saved_bytes(64, rows, 0.25)
    assert held["keep"] == rows * 32 * 4 + relu_out  # x, and the ReLU output (also fc2's input)
    # The ReLU output stays (ReLU saves it): sampling frees only what no other op holds.
    assert held["sample"] == relu_out + expected, held
