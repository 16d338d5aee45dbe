"""Natural GaLore: the Woodbury natural gradient and its bounded history."""

from __future__ import annotations

import torch

from memopt.optim import NaturalGaLoreAdamW, state_bytes
from memopt.optim._functional import woodbury_natural_gradient, woodbury_newest_


def test_woodbury_equals_direct_inverse():
    torch.manual_seed(0)
    hist = torch.randn(5, 40, dtype=torch.float64)
    low = torch.randn(8, 5, dtype=torch.float64)
    damping = 1e-2
    direct = torch.linalg.solve(
        damping * torch.eye(40, dtype=torch.float64) + hist.T @ hist, low.reshape(-1)
    )
    torch.testing.assert_close(woodbury_natural_gradient(low, hist, damping).reshape(-1), direct)


def test_the_kept_gram_matrix_gives_the_recomputed_result_through_wraparound():
    """The ring buffer as the optimizer fills it (s = 3, eight gradients, so rows are
    overwritten twice): the kept Gram matrix equals H H^T and the step the reference's."""
    torch.manual_seed(1)
    s, damping = 3, 1e-3
    hist = torch.zeros(s, 24, dtype=torch.float64)
    gram = torch.zeros(s, s, dtype=torch.float64)
    for count in range(8):
        low = torch.randn(6, 4, dtype=torch.float64)
        row = count % s
        hist[row] = low.reshape(-1)
        filled = hist[: min(count + 1, s)]
        got = woodbury_newest_(low, filled, gram, row, damping)
        n = filled.shape[0]
        torch.testing.assert_close(gram[:n, :n], filled @ filled.T)
        torch.testing.assert_close(got, woodbury_natural_gradient(low, filled, damping))


def test_resume_keeps_the_gram_matrix_and_rebuilds_a_missing_one():
    import io

    def make(p):
        return NaturalGaLoreAdamW(
            [{"params": [p], "rank": 4, "update_proj_gap": 50, "natural_history": 3}], lr=1e-2
        )

    torch.manual_seed(2)
    grads = [torch.randn(32, 16) for _ in range(9)]
    p = torch.nn.Parameter(torch.randn(32, 16))
    opt = make(p)
    for g in grads[:5]:
        p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = make(q)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for g in grads[5:]:
        for o, x in ((opt, p), (opt2, q)):
            x.grad = g.clone()
            o.step()
    assert torch.equal(p, q)  # bit for bit: the Gram matrix is saved state
    # a snapshot without it (saved before it was kept) rebuilds it from the history
    opt2.state[q].pop("nat_gram")
    q.grad = torch.randn(32, 16)
    opt2.step()
    st = opt2.state[q]
    hist = st["nat_hist"]
    torch.testing.assert_close(st["nat_gram"], hist @ hist.T)


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
    # persistent state: moments 2 * 32 * 4, basis 4 * 16, history 3 * 32 * 4 floats and
    # the history's 3 x 3 Gram matrix
    assert state_bytes(opt).total == 4 * (2 * 32 * 4 + 4 * 16 + 3 * 32 * 4 + 3 * 3)
    p.grad = torch.randn_like(p)
    opt.step()  # step index 4 < 5: no refresh yet
    p.grad = torch.randn_like(p)
    opt.step()  # step index 5: refresh clears the history, then stores this gradient
    assert st["nat_count"] == 1
    assert torch.count_nonzero(st["nat_hist"][1:]) == 0
    hist = st["nat_hist"]
    torch.testing.assert_close(st["nat_gram"], hist @ hist.T)  # cleared with the history


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


def test_bf16_parameters_keep_the_natural_gradient_in_fp32():
    """bf16 parameters: the history, its Gram matrix and the solve stay fp32 (before, the
    solve raised NotImplementedError: LAPACK has no bf16 solve; and the Woodbury step's
    cancellation left bf16 arithmetic mostly noise: cosine 0.04 to the fp32 run's update),
    the moments bf16; the weights move as the fp32 run's do."""
    torch.manual_seed(3)
    w = torch.randn(32, 16)
    grads = [torch.randn(32, 16) for _ in range(6)]

    def run(dtype):
        p = torch.nn.Parameter(w.to(dtype).clone())
        opt = NaturalGaLoreAdamW([{"params": [p], "rank": 4, "natural_history": 3}], lr=1e-1)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        return (p.detach().float() - w.to(dtype).float()).reshape(-1), opt.state[p]

    d16, st = run(torch.bfloat16)
    assert st["nat_hist"].dtype == torch.float32 and st["nat_gram"].dtype == torch.float32
    assert st["exp_avg"].dtype == torch.bfloat16
    d32, _ = run(torch.float32)
    assert torch.isfinite(d16).all() and d32.abs().max() > 0.05
    assert torch.nn.functional.cosine_similarity(d16, d32, dim=0) > 0.98
