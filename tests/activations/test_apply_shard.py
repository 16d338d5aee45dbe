"""Swap and recompute under memopt.shard stages 2 and 3 on 2 gloo ranks: same as unmanaged.

Each rank builds two copies of one model, shards both (stage 2: ZeRO-2, gradients
reduce-scattered from post-accumulate-grad hooks while the backward runs; stage 3: FSDP2, the
parameters all-gathered by module hooks around the managed forwards), manages one copy's blocks
(swap and recompute), and trains both on the same rank-local data for 3 steps: losses and
(local shards of) parameters must be bit-identical.
"""

from __future__ import annotations

import torch

from tests._harness.dist import run_distributed


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _train(rank: int, world: int, stage: int) -> list[float]:
    import memopt
    from memopt.activations import ActivationOptions, apply
    from memopt.activations.policy import recompute, swap
    from memopt.optim import AdamW
    from tests.activations._models import make_stack

    results, models = [], []
    for managed in (False, True):
        model = make_stack(depth=3)
        opt = AdamW(model.parameters(), lr=1e-2)
        model, sharded = memopt.shard(model, opt, stage=stage, bucket_bytes=4096)
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
            # 2 swapped blocks x (input, fc output, gelu output) x 3 steps; weights skipped
            assert mgr.swap.stats["swapped"] == 18, mgr.swap.stats
            assert mgr.swap.stats["weights"] > 0
            mgr.remove()
        results.append(losses)
        models.append(model)
    assert results[0] == results[1], f"stage {stage} rank {rank}: losses differ {results}"
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(_local(a), _local(b)), f"stage {stage} rank {rank}: params differ"
    return results[1]


def _both_stages(rank: int, world: int) -> list[list[float]]:
    return [_train(rank, world, stage) for stage in (2, 3)]


def test_swap_and_recompute_under_zero2_and_fsdp2_match_unmanaged() -> None:
    out = run_distributed(_both_stages, world_size=2, timeout_s=180)
    assert len(out) == 2 and all(len(r) == 2 and len(r[0]) == 3 for r in out)
