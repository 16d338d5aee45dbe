"""Refreshes of same-shape parameters run as one batched call, with the same result."""

from __future__ import annotations

import pytest
import torch

from memopt.optim import GaLoreAdamW
from memopt.optim.projection import dense


def _params():
    torch.manual_seed(0)
    shapes = [(24, 12)] * 4 + [(12, 24)] * 2 + [(16, 16)]
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


def _grads(step, params):
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=gen) for p in params]


@pytest.mark.parametrize("proj", ["svd", "rsvd", "subspace", "gram"])
def test_batched_equals_per_parameter(monkeypatch, proj):
    calls = []
    name = {"svd": "thin_svd", "gram": "gram_eigh"}.get(proj, "randomized_svd")
    real = getattr(dense, name)

    def counting(g, *args, **kwargs):
        calls.append(tuple(g.shape))
        return real(g, *args, **kwargs)

    monkeypatch.setattr(dense, name, counting)
    batched, single = _params(), _params()
    opt_b = GaLoreAdamW([{"params": batched, "rank": 3, "update_proj_gap": 2, "proj": proj}])
    opt_s = GaLoreAdamW([{"params": single, "rank": 3, "update_proj_gap": 2, "proj": proj}])
    for step in range(5):
        calls.clear()
        for p, g in zip(batched, _grads(step, batched), strict=True):
            p.grad = g
        opt_b.step()
        batched_calls = list(calls)
        for p, g in zip(single, _grads(step, single), strict=True):
            p.grad = g
            opt_s.step_one(p)  # the per-parameter path: no batching
        if step % 2 == 0:  # refresh steps: one call per shape group in the batched run
            sizes = sorted(c[0] if len(c) == 3 else 1 for c in batched_calls)
            assert sizes == [1, 2, 4]
    for a, b in zip(batched, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_in_a_batch_still_names_the_parameter():
    ps = _params()[:4]
    opt = GaLoreAdamW([{"params": ps, "param_names": ["a", "b", "c", "d"], "rank": 3}])
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[2].grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="gradient of c"):
        opt.step()
