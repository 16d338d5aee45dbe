"""Swap and recompute under memopt.shard stage 2 on 2 gloo ranks: identical to no management.

Each rank builds two copies of one model, shards both with ZeRO-2 (gradients reduce-scattered
from post-accumulate-grad hooks while the backward runs), manages one copy's blocks (swap and
recompute), and trains both on the same rank-local data for 3 steps: losses and parameters must
be bit-identical (swap) / equal (recompute: the same ops re-run give the same bits on CPU).
"""

from __future__ import annotations

import torch

from tests._harness.dist import run_distributed


def _train(rank: int, world: int) -> list[float]:
    import memopt
    from memopt.activations import ActivationOptions, apply
    from memopt.activations.policy import recompute, swap
    from memopt.optim import AdamW
    from tests.activations._models import make_stack

    results = []
    models = []
    for managed in (False, True):
        model = make_stack(depth=3)
        opt = AdamW(model.parameters(), lr=1e-2)
        model, sharded = memopt.shard(model, opt, stage=2, bucket_bytes=4096)
        mgr = None
        if managed:
            plan = {"blocks.0": swap(), "blocks.1": recompute(), "blocks.2": swap()}
            mgr = apply(model, plan, options=ActivationOptions(min_swap_bytes=1024))
        g = torch.Generator().manual_seed(100 + rank)
        losses = []
        for _ in range(3):
            x = torch.randn(16, 64, generator=g)
            loss = model(x).pow(2).mean()
            loss.backward()
            sharded.step()
            sharded.zero_grad()
            losses.append(loss.item())
        if mgr is not None:
            assert mgr.swap.stats["swapped"] > 0
            mgr.remove()
        results.append(losses)
        models.append(model)
    assert results[0] == results[1], f"rank {rank}: losses differ {results}"
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), f"rank {rank}: parameters differ"
    return results[1]


def test_swap_and_recompute_under_zero2_match_unmanaged() -> None:
    out = run_distributed(_train, world_size=2, timeout_s=120)
    assert len(out) == 2 and all(len(r) == 3 for r in out)
