"""GaLoreAdamW: parity with galore-torch 1.0 and the fixes beyond it."""

from __future__ import annotations

import warnings

import pytest
import torch

from memopt.optim import GaLoreAdamW

galore_torch = pytest.importorskip("galore_torch")  # in the dev extra; CI installs it


def _pair(shape, proj_type, rank=8, gap=3, steps=10, wd=0.1, dtype=torch.float32):
    w0, b0 = torch.randn(shape, dtype=dtype), torch.randn(shape[0], dtype=dtype)
    pa, pb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ba, bb = torch.nn.Parameter(b0.clone()), torch.nn.Parameter(b0.clone())
    opts = {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": proj_type}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = galore_torch.GaLoreAdamW(
            [{"params": [ba]}, {"params": [pa], **opts}], lr=1e-2, weight_decay=wd
        )
    mine = GaLoreAdamW([{"params": [bb]}, {"params": [pb], **opts}], lr=1e-2, weight_decay=wd)
    for _ in range(steps):
        g, gb = torch.randn(shape, dtype=dtype), torch.randn(shape[0], dtype=dtype)
        pa.grad, pb.grad, ba.grad, bb.grad = g.clone(), g.clone(), gb.clone(), gb.clone()
        ref.step()
        mine.step()
    return (pa, ba), (pb, bb), mine


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (40, 40)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_matches_galore_torch_across_refreshes(shape, proj_type):
    if proj_type == "reverse_std" and shape == (40, 40):
        pytest.skip("covered by test_reverse_std_square_projection (the reference crashes)")
    (pa, ba), (pb, bb), _ = _pair(shape, proj_type)
    torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-5)


def test_moment_shapes_are_low_rank():
    _, (pb, _), opt = _pair((64, 32), "std", rank=8)
    assert opt.state[pb]["exp_avg"].shape == (64, 8)
    assert opt.state[pb]["proj_P"].shape == (8, 32)


def test_reverse_std_square_projection():
    # galore-torch picks the back-projection side from R's shape and crashes when R is square.
    p = torch.nn.Parameter(torch.randn(32, 64))
    opt = GaLoreAdamW([{"params": [p], "rank": 32, "proj_type": "reverse_std"}], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[p]["exp_avg"].shape == (32, 32)
    assert torch.isfinite(p).all()


def test_update_has_rank_r_and_lies_in_subspace():
    p = torch.nn.Parameter(torch.zeros(48, 24))
    opt = GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 100}], lr=1e-2)
    p.grad = torch.randn(48, 24)
    opt.step()
    assert torch.linalg.matrix_rank(p.detach()) == 4
    basis = opt.state[p]["proj_P"]  # right side: rows span the update's row space
    resid = p.detach() - p.detach() @ basis.T @ basis
    assert resid.abs().max() < 1e-6


def test_one_dim_and_conv_params():
    bias = torch.nn.Parameter(torch.randn(16))
    conv = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    with pytest.warns(UserWarning, match="1-D parameter"):
        opt = GaLoreAdamW([{"params": [bias, conv], "rank": 4}], lr=1e-2)
        for _ in range(3):
            bias.grad, conv.grad = torch.randn_like(bias), torch.randn_like(conv)
            opt.step()
    assert opt.state[bias]["exp_avg"].shape == (16,)  # full state for the 1-D parameter
    # viewed as an 8 x 36 matrix; m < n so the left side (8) is reduced to rank 4
    assert opt.state[conv]["exp_avg"].shape == (4, 36)


@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_moments_policy_on_refresh(policy):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    opt = GaLoreAdamW(
        [{"params": [p], "rank": 4, "update_proj_gap": 2, "moments": policy}], lr=1e-2
    )
    p.grad = torch.randn_like(p)
    opt.step()
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    m_before, basis_before = st["exp_avg"].clone(), st["proj_P"].clone()
    p.grad = torch.randn_like(p)
    g = p.grad.clone()
    opt.step()  # step index 2: refresh
    assert not torch.equal(st["proj_P"], basis_before)
    b1 = 0.9
    low_new = g @ st["proj_P"].T
    if policy == "keep":
        expect = b1 * m_before + (1 - b1) * low_new
    elif policy == "reset":
        expect = (1 - b1) * low_new
        assert st["moments_since"] == 2
    else:
        change = basis_before @ st["proj_P"].T
        expect = b1 * (m_before @ change) + (1 - b1) * low_new
    torch.testing.assert_close(st["exp_avg"], expect, rtol=1e-5, atol=1e-6)


def test_rotate_preserves_a_moment_inside_both_subspaces():
    # When the new basis spans the old one, rotation maps the moment to the same full matrix.
    from memopt._utils.logging import _reset_warn_once

    _reset_warn_once()
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = GaLoreAdamW(
        [
            {
                "params": [p],
                "rank": 8,
                "update_proj_gap": 1,
                "moments": "rotate",
                "proj_type": "right",
            }
        ],
        lr=0.0,
    )
    p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="clamped to 8"):
        opt.step()
    st = opt.state[p]
    full_before = st["exp_avg"] @ st["proj_P"]
    p.grad = torch.zeros_like(p)
    p.grad[0, 0] = 1.0  # any gradient: rank 8 = full width, so the subspace is all of R^8
    opt.step()
    low = p.grad @ st["proj_P"].T  # remove this step's gradient term, undo its decay
    full_after = (st["exp_avg"] - 0.1 * low) @ st["proj_P"] / 0.9
    torch.testing.assert_close(full_after, full_before, rtol=1e-4, atol=1e-5)


def test_stagger_spreads_refreshes():
    ps = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(4)]
    opt = GaLoreAdamW([{"params": ps, "rank": 2, "update_proj_gap": 8, "stagger": True}], lr=1e-3)
    refresh_steps: dict[int, list[int]] = {i: [] for i in range(4)}
    for step in range(16):
        counts = [opt.state[p].get("proj_count", -1) for p in ps]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        for i, p in enumerate(ps):
            if opt.state[p]["proj_count"] != counts[i]:
                refresh_steps[i].append(step)
    assert refresh_steps == {0: [0, 8], 1: [0, 2, 10], 2: [0, 4, 12], 3: [0, 6, 14]}


@pytest.mark.parametrize("proj", ["rsvd", "subspace", "gram"])
def test_cheap_refresh_finds_the_dominant_subspace(proj):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    s = torch.cat([torch.tensor([100.0, 80, 60, 40]), torch.full((28,), 0.1)])
    g = u[:, :32] @ torch.diag(s) @ v.T  # 64 x 32, rank-4 dominant
    p = torch.nn.Parameter(torch.zeros(64, 32))
    opt = GaLoreAdamW([{"params": [p], "rank": 4, "proj": proj, "update_proj_gap": 1}], lr=0.0)
    for _ in range(3):
        p.grad = g + 0.01 * torch.randn_like(g)
        opt.step()
    basis = opt.state[p]["proj_P"]  # 4 x 32, should span v[:, :4]
    overlap = torch.linalg.matrix_norm(basis @ v[:, :4]) ** 2
    assert overlap > 3.99


def test_bf16_params_with_fp32_state():
    p = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [p], "rank": 4}], lr=1e-2, state_dtype="float32")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == torch.float32 and st["proj_P"].dtype == torch.float32
    assert p.dtype == torch.bfloat16


def test_bf16_default_state_follows_param_dtype():
    p = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [p], "rank": 4}], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
