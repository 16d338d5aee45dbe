"""APOLLO / APOLLO-Mini: parity with apollo-torch fed the same projection; full-rank update."""

from __future__ import annotations

import pytest
import torch

from memopt.optim import ApolloAdamW, ApolloMini

apollo_torch = pytest.importorskip("apollo_torch")  # in the dev extra; CI installs it
random_projector = pytest.importorskip("apollo_torch.random_projector")


def _feed_same_projection(monkeypatch, mine, param):
    """apollo-torch draws its own Gaussian; hand it memopt's matrix for this refresh."""

    def fake(self, weights, rank, type, seed):  # noqa: A002 - the reference's signature
        return mine.state[param]["cache_P"].clone()

    monkeypatch.setattr(random_projector.GradientProjector, "get_orthogonal_matrix", fake)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
@pytest.mark.parametrize(
    "scale_type,rank,scale", [("channel", 8, 1.0), ("tensor", 1, 128.0), ("channel", 4, 4.0)]
)
@pytest.mark.parametrize("front", [False, True])
def test_matches_apollo_torch(monkeypatch, shape, scale_type, rank, scale, front):
    w0 = torch.randn(shape)
    pa, pb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opts = {
        "rank": rank,
        "update_proj_gap": 3,
        "scale": scale,
        "proj_type": "std",
        "proj": "random",
        "scale_type": scale_type,
    }
    mine = ApolloAdamW([{"params": [pb], **opts}], lr=1e-2, weight_decay=0.1, scale_front=front)
    ref = apollo_torch.APOLLOAdamW(
        [{"params": [pa], **opts}], lr=1e-2, weight_decay=0.1, scale_front=front
    )
    _feed_same_projection(monkeypatch, mine, pb)
    for s in range(10):
        g = torch.randn(shape) * (1 + s)  # growing norms exercise the limiter
        pb.grad = g.clone()
        mine.step()
        pa.grad = g.clone()
        ref.step()
    torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)


def test_mini_group_of_many_matches_apollo_torch(monkeypatch):
    # The benchmark's case: many matrices in one Mini group take the batched path (stacked
    # factors and limiter); each must still follow apollo-torch's per-matrix step, refreshes
    # (gap 3) and norm-growth limiter (gradients that grow and shrink) included.
    shapes = [(64, 32), (32, 48), (40, 40)]
    w0 = [torch.randn(s) for s in shapes]
    pa = [torch.nn.Parameter(w.clone()) for w in w0]
    pb = [torch.nn.Parameter(w.clone()) for w in w0]
    opts = {"rank": 1, "update_proj_gap": 3, "proj_type": "std", "proj": "random"}
    mine = ApolloMini([{"params": pb, **opts}], lr=1e-2, weight_decay=0.1)
    ref = apollo_torch.APOLLOAdamW(
        [{"params": pa, **opts, "scale": 128.0, "scale_type": "tensor"}], lr=1e-2, weight_decay=0.1
    )
    current = {}  # memopt's projection per shape, handed to the reference at its refreshes

    def fake(self, weights, rank, type, seed):  # noqa: A002 - the reference's signature
        return current[tuple(weights.shape)].clone()

    monkeypatch.setattr(random_projector.GradientProjector, "get_orthogonal_matrix", fake)
    for s in range(12):
        gs = [torch.randn(sh) * (1 + s) * (0.3 if s % 4 == 3 else 1.0) for sh in shapes]
        for p, g in zip(pb, gs, strict=True):
            p.grad = g.clone()
        mine.step()
        current.update({tuple(p.shape): mine.state[p]["cache_P"] for p in pb})
        for p, g in zip(pa, gs, strict=True):
            p.grad = g.clone()
        ref.step()
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_update_is_full_rank():
    # The paper's APOLLO scales the raw gradient; a rank-r update would be another method.
    p = torch.nn.Parameter(torch.zeros(48, 24))
    opt = ApolloMini([{"params": [p], "rank": 1}], lr=1e-2)
    p.grad = torch.randn(48, 24)
    opt.step()
    assert torch.linalg.matrix_rank(p.detach()) == 24


def test_projection_is_seeded_not_stored_and_rank_consistent():
    p1 = torch.nn.Parameter(torch.randn(32, 16))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = ApolloAdamW([{"params": [p1], "rank": 4}], lr=1e-2, seed=7)
    o2 = ApolloAdamW([{"params": [p2], "rank": 4}], lr=1e-2, seed=7)
    torch.manual_seed(123)  # global RNG state must not matter ("another rank")
    g = torch.randn(32, 16)
    p1.grad, p2.grad = g.clone(), g.clone()
    o1.step()
    torch.manual_seed(999)
    o2.step()
    torch.testing.assert_close(o1.state[p1]["cache_P"], o2.state[p2]["cache_P"], rtol=0, atol=0)
    saved = o1.state_dict()["state"][0]
    assert "cache_P" not in saved and isinstance(saved["proj_seed"], int)


def test_mini_state_is_tiny():
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = ApolloMini([{"params": [p], "rank": 1}], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].shape == (64, 1) and st["exp_avg_sq"].shape == (64, 1)
    assert opt.param_groups[0]["scale"] == 128.0 and opt.param_groups[0]["scale_type"] == "tensor"


def test_limiter_caps_growth():
    p = torch.nn.Parameter(torch.zeros(16, 8))
    opt = ApolloAdamW([{"params": [p], "rank": 2, "scale_type": "tensor"}], lr=1.0, betas=(0, 0))
    deltas = []
    for s in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(16, 8) * (10.0**s)
        opt.step()
        deltas.append(torch.linalg.norm(p.detach() - before).item())
    # bias corrections are 1 with betas 0, so the update norm may grow by at most 1.01x
    assert deltas[1] <= deltas[0] * 1.01 * (1 + 1e-5)
    assert deltas[2] <= deltas[1] * 1.01 * (1 + 1e-5)


def test_rejects_two_sided_projection():
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(NotImplementedError, match="full"):
        ApolloAdamW([{"params": [p], "rank": 2, "proj_type": "full"}])


@pytest.mark.parametrize("proj", ["columns", "randperm", "coordinate"])
def test_rejects_index_projectors_at_construction(proj):
    """They select entries and have no basis side to scale: the first step raised
    KeyError('proj_right'); now construction says which projectors work."""
    p = torch.nn.Parameter(torch.randn(8, 6))
    key = {"density": 0.25} if proj == "coordinate" else {"rank": 2}
    with pytest.raises(NotImplementedError, match=f"proj='{proj}'.*'orthogonal'.*'svd'"):
        ApolloAdamW([{"params": [p], "proj": proj, **key}])
    ApolloAdamW([{"params": [p], "proj": "orthogonal", "rank": 2}])  # a basis: fine


@pytest.mark.parametrize("make", [
    lambda p: ApolloAdamW([{"params": [p], "rank": 2}], lr=1e-2),
    lambda p: ApolloMini([{"params": [p], "rank": 1}], lr=1e-2),
], ids=["apollo", "mini"])  # fmt: skip
def test_an_all_zero_gradient_does_not_freeze_the_next_steps(make):
    """One step whose gradient is all zeros (zero_grad(set_to_none=False), a module unused on
    that step) must not stall the parameter: the limiter kept the zero norm as its previous
    one, and every later update was divided by ~1e8 and recovered 1.01x per step (~1500
    steps without moving, as apollo-torch does). Now the next steps move as without it."""
    torch.manual_seed(0)
    grads = [torch.randn(32, 16) for _ in range(6)]
    moves = {}
    for zero_at in (None, 2):
        p = torch.nn.Parameter(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)))
        opt = make(p)
        moved = []
        for s, g in enumerate(grads):
            before = p.detach().clone()
            p.grad = torch.zeros_like(g) if s == zero_at else g.clone()
            opt.step()
            moved.append(torch.linalg.norm(p.detach() - before).item())
        moves[zero_at] = moved
    plain, skipped = moves[None], moves[2]
    assert skipped[2] == 0.0  # (no gradient, no weight decay: nothing to do)
    for s in (3, 4, 5):  # the moments differ (one zero step), the scale of the move does not
        assert 0.3 * plain[s] < skipped[s] < 3 * plain[s], (s, plain, skipped)


def test_a_zero_first_gradient_sets_no_limit():
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = ApolloAdamW([{"params": [p], "rank": 2}], lr=1e-2)
    p.grad = torch.zeros(16, 8)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.randn(16, 8)
    opt.step()
    assert torch.linalg.norm(p.detach() - before) > 1e-4  # before: ~1e-10 (divided by 1e8)
