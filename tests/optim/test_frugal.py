"""FRUGAL: state-full subspace + state-free residual; block mode; reset on refresh."""

from __future__ import annotations

import warnings

import pytest
import torch

from memopt.optim import FrugalAdamW, state_bytes


def test_subspace_plus_sign_residual_equals_formula():
    torch.manual_seed(0)
    w0 = torch.randn(16, 8)
    p = torch.nn.Parameter(w0.clone())
    opt = FrugalAdamW(
        [{"params": [p], "density": 0.25, "proj": "columns", "proj_type": "right"}], lr=0.1
    )
    g = torch.randn(16, 8)
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    cols = st["cache_cols"]
    assert len(cols) == 2
    expect = w0 - 0.1 * torch.sign(g)  # state-free everywhere ...
    # ... except the selected columns, which get Adam's first step: g / (|g| + eps) = sign(g)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[cols] = True
    assert torch.allclose(p.detach()[:, ~mask], expect[:, ~mask])
    adam_first = w0[:, mask] - 0.1 * g[:, mask] / (g[:, mask].abs() + 1e-8)
    assert torch.allclose(p.detach()[:, mask], adam_first, atol=1e-6)


def test_residual_is_orthogonal_complement_for_svd():
    p = torch.nn.Parameter(torch.zeros(24, 12))
    opt = FrugalAdamW(
        [{"params": [p], "density": 0.25, "proj": "svd", "inactive_update_rule": "sgd"}],
        lr=1.0,
        betas=(0.0, 0.0),
        eps=1e-30,
    )
    g = torch.randn(24, 12)
    p.grad = g.clone()
    opt.step()
    basis = opt.state[p]["proj_P"]  # right side, 3 x 12
    inside = -p.detach() @ basis.T @ basis
    outside = -p.detach() - inside
    torch.testing.assert_close(outside, g - g @ basis.T @ basis, rtol=1e-4, atol=1e-5)


def test_moments_reset_on_refresh():
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = FrugalAdamW(
        [{"params": [p], "density": 0.5, "proj": "orthogonal", "update_proj_gap": 2}], lr=1e-2
    )
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    assert st["moments_since"] == 2 and opt.bias_step(st) == 1
    g_low = p.grad @ st["cache_P"].T
    torch.testing.assert_close(st["exp_avg"], 0.1 * g_low)


def _active_per_step(opt, ps, steps, each=None):
    """Indices of the tensors holding moments after each of ``steps`` random-gradient steps."""
    out = []
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        out.append(tuple(i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]))
        if each is not None:
            each()
    return out


def test_block_mode_memory_follows_density():
    ps = [torch.nn.Parameter(torch.randn(32, 32)) for _ in range(8)]
    opt = FrugalAdamW(
        [
            {
                "params": ps,
                "density": 0.25,
                "proj": "block",
                "update_proj_gap": 2,
                "block_order": "ascending",
            }
        ],
        lr=1e-2,
    )
    def two_of_eight():
        assert state_bytes(opt).total == 2 * (2 * 32 * 32 * 4)  # 2 of 8 tensors, m and v

    active_sets = _active_per_step(opt, ps, 8, two_of_eight)
    assert active_sets == [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5), (6, 7), (6, 7)]


def test_block_mirror_pairs_both_ends_as_the_reference():
    ps = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(6)]
    opt = FrugalAdamW([{"params": ps, "density": 1 / 3, "proj": "block", "update_proj_gap": 1,
                        "block_order": "mirror"}])  # fmt: skip
    seen = _active_per_step(opt, ps, 4)
    assert seen == [(0, 5), (1, 4), (2, 3), (0, 5)]  # (it walked 0,1 / 2,3 / 4,5 / 5,4)


def test_block_mode_decays_active_and_inactive_tensors_alike():
    # the reference decays every tensor by lr * wd; the active one was decayed by the scaled lr
    p, q = torch.nn.Parameter(torch.full((2, 2), 2.0)), torch.nn.Parameter(torch.full((2, 2), 2.0))
    opt = FrugalAdamW([{"params": [p, q], "density": 0.5, "proj": "block", "update_proj_gap": 1,
                        "block_order": "ascending", "proj_params_lr_scale": 0.5}],
                      lr=0.1, weight_decay=0.5)  # fmt: skip
    p.grad, q.grad = torch.ones(2, 2), torch.ones(2, 2)
    opt.step()
    assert "exp_avg" in opt.state[p] and "exp_avg" not in opt.state[q]
    # both: 2 * (1 - 0.1 * 0.5) - 0.1 * 0.5 (Adam's first step and sign(g) are both 1)
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 1.85))
    torch.testing.assert_close(q.detach(), torch.full((2, 2), 1.85))


def test_block_random_order_is_seeded():
    def run(seed):
        ps = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(6)]
        opt = FrugalAdamW(
            [
                {
                    "params": ps,
                    "density": 0.5,
                    "proj": "block",
                    "update_proj_gap": 1,
                    "block_order": "random",
                }
            ],
            seed=seed,
        )
        return _active_per_step(opt, ps, 4)

    first = run(3)
    assert first == run(3)
    assert set(first[0]).isdisjoint(first[1])  # a pass visits every tensor before repeating


def test_state_free_group_holds_no_state():
    emb = torch.nn.Parameter(torch.randn(10, 4))
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = FrugalAdamW(
        [{"params": [w], "density": 0.25}, {"params": [emb], "state_free": True}], lr=0.1
    )
    e0 = emb.detach().clone()
    emb.grad, w.grad = torch.randn_like(emb), torch.randn_like(w)
    opt.step()
    assert [k for k, v in opt.state[emb].items() if isinstance(v, torch.Tensor)] == []
    torch.testing.assert_close(emb.detach(), e0 - 0.1 * torch.sign(emb.grad))


def test_rejects_non_orthonormal_projector():
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="orthonormal"):
        FrugalAdamW([{"params": [p], "density": 0.25, "proj": "random"}])


@pytest.mark.parametrize(
    "size", [{"density": 1.0}, {"rank": 8}, {"rank": 32}, {"density": 1.0, "proj_type": "right"}]
)
@pytest.mark.parametrize("proj", ["svd", "orthogonal", "columns", "coordinate"])
def test_whole_space_subspace_has_no_residual_step(size, proj):
    if proj == "coordinate" and "rank" in size:
        pytest.skip("coordinate selection takes density only")
    """A subspace that is the whole matrix leaves nothing for the state-free rule: the step
    equals the one without it. (The residual G - P P^T G of an orthonormal basis is
    round-off there, and sign_sgd used to turn it into a full +-lr step on every entry.)"""
    w0, g = torch.randn(16, 8), torch.randn(16, 8)
    out = {}
    for rule in ("none", "sign_sgd", "sgd"):
        p = torch.nn.Parameter(w0.clone())
        group = {"params": [p], "proj": proj, "inactive_update_rule": rule, **size}
        with warnings.catch_warnings():  # (rank at the full side: clamped, warned once)
            warnings.simplefilter("ignore")
            opt = FrugalAdamW([group], lr=1e-3)
            p.grad = g.clone()
            opt.step()
        out[rule] = p.detach()
    assert torch.equal(out["sign_sgd"], out["none"])
    assert torch.equal(out["sgd"], out["none"])


def test_coordinate_mode_on_a_transposed_parameter_equals_the_contiguous_one():
    # (apply_update flattened the parameter with .view(-1), which a transposed one refuses)
    def run(transposed: bool) -> torch.Tensor:
        w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        p = torch.nn.Parameter(w.t().contiguous().t() if transposed else w.clone())
        opt = FrugalAdamW([{"params": [p], "density": 0.25, "proj": "coordinate",
                            "update_proj_gap": 2}], lr=1e-2)  # fmt: skip
        for k in range(3):
            g = torch.randn(16, 8, generator=torch.Generator().manual_seed(k + 1))
            p.grad = g.t().contiguous().t() if transposed else g
            opt.step()
        return p.detach().contiguous()

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=1e-7)


def test_density_zero_needs_block_mode():
    with pytest.raises(ValueError, match="density 0 keeps no state-full subspace.*proj='block'"):
        FrugalAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "density": 0.0}])
    FrugalAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "density": 0.0,
                  "proj": "block"}])  # fmt: skip


@pytest.mark.parametrize("late", [False, True], ids=["one-step-skipped", "first-grad-late"])
def test_block_rotation_keeps_a_tensor_without_a_gradient_in_phase(late):
    """A tensor with no gradient on some steps (unused that step, or unfrozen later) keeps its
    slot in block mode's rotation: exactly a density share holds Adam state at each step. The
    window came from each tensor's own step count, so after one skipped step 3 of 4 tensors
    held state at once (1.5x the knob), then 1, for the rest of the run."""
    ps = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(4)]
    opt = FrugalAdamW([{"params": ps, "density": 0.5, "proj": "block", "update_proj_gap": 2,
                        "block_order": "ascending"}], lr=1e-3)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for s in range(12):
        for i, p in enumerate(ps):
            skip = i == 0 and (s < 3 if late else s == 1)
            p.grad = None if skip else torch.randn(8, 8, generator=gen)
        opt.step()
        held = [i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]]
        expect = [0, 1] if (s // 2) % 2 == 0 else [2, 3]
        if late and s < 3:
            expect = [i for i in expect if i != 0]
        assert held == expect, (s, held)
