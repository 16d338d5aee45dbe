"""Natural GaLore: the Woodbury natural gradient and its bounded history."""

from __future__ import annotations

import torch

from memopt.optim import NaturalGaLoreAdamW, state_bytes
from memopt.optim._functional import woodbury_natural_gradient


def test_woodbury_equals_direct_inverse():
    torch.manual_seed(0)
    hist = torch.randn(5, 40, dtype=torch.float64)
    low = torch.randn(8, 5, dtype=torch.float64)
    damping = 1e-2
    direct = torch.linalg.solve(
        damping * torch.eye(40, dtype=torch.float64) + hist.T @ hist, low.reshape(-1)
    )
    torch.testing.assert_close(woodbury_natural_gradient(low, hist, damping).reshape(-1), direct)


def test_history_is_bounded_counted_and_reset_on_refresh():
    p = torch.nn.Parameter(torch.randn(32, 16))
    opt = NaturalGaLoreAdamW(
        [{"params": [p], "rank": 4, "update_proj_gap": 5, "natural_history": 3}], lr=1e-2
    )
    for _ in range(4):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    assert st["nat_hist"].shape == (3, 32 * 4) and st["nat_count"] == 4
    # persistent state: moments 2 * 32 * 4, basis 4 * 16, history 3 * 32 * 4 floats
    assert state_bytes(opt).total == 4 * (2 * 32 * 4 + 4 * 16 + 3 * 32 * 4)
    p.grad = torch.randn_like(p)
    opt.step()  # step index 4 < 5: no refresh yet
    p.grad = torch.randn_like(p)
    opt.step()  # step index 5: refresh clears the history, then stores this gradient
    assert st["nat_count"] == 1
    assert torch.count_nonzero(st["nat_hist"][1:]) == 0


def test_converges_on_noisy_least_squares_faster_than_galore_at_full_rank():
    # The empirical Fisher is a statement about gradient noise: test it on mini-batches.
    from memopt.optim import GaLoreAdamW

    torch.manual_seed(0)
    w_true, x = torch.randn(16, 32), torch.randn(512, 32)
    y = x @ w_true.T + 0.01 * torch.randn(512, 16)

    def run(cls):
        torch.manual_seed(1)
        p = torch.nn.Parameter(torch.zeros(16, 32))
        opt = cls(
            [{"params": [p], "rank": 15, "update_proj_gap": 1000, "scale": 1.0}], lr=0.02, eps=1e-8
        )
        for _ in range(300):
            idx = torch.randint(0, 512, (32,))
            opt.zero_grad()
            ((x[idx] @ p.T - y[idx]) ** 2).mean().backward()
            opt.step()
        return ((x @ p.T - y) ** 2).mean().item()

    start = (y**2).mean().item()
    natural, galore = run(NaturalGaLoreAdamW), run(GaLoreAdamW)
    assert natural < 0.05 * start
    assert natural < galore
