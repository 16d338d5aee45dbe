"""Random projections and randomized SVDs are identical on every rank (2 ranks, gloo)."""

from __future__ import annotations

import torch

from tests._harness.dist import run_distributed


def _projections_on_rank(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from memopt.optim import ApolloAdamW, FrugalAdamW, GaLoreAdamW

    torch.manual_seed(1000 + rank)  # different global RNG on each rank
    g = torch.ones(24, 12)
    dist.broadcast(g.copy_(torch.randn(24, 12)), src=0)  # the same (all-reduced) gradient
    checks = []
    for cls, group in [
        (ApolloAdamW, {"rank": 4}),
        (GaLoreAdamW, {"rank": 4, "proj": "rsvd"}),
        (FrugalAdamW, {"density": 0.25, "proj": "columns"}),
    ]:
        p = torch.nn.Parameter(torch.zeros(24, 12))
        opt = cls([{"params": [p], **group}], lr=1e-2)
        p.grad = g.clone()
        opt.step()
        checks.append(p.detach().clone())
    mine = torch.stack([c.flatten() for c in checks])
    other = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(other, mine)
    for t in other:
        assert torch.equal(t, mine), "ranks drew different projections"


def test_projections_match_across_ranks():
    run_distributed(_projections_on_rank, world_size=2, timeout_s=90)
