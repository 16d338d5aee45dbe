"""ZeRO-1/2 on 2 gloo ranks equals a single-process run over the same global batch.

Every stage (1, 2) x layout (whole_tensor, dim0) x optimizer (AdamW, GaLore, APOLLO, FRUGAL)
runs inside one spawned process group (spawning is the slow part): 10 steps with gradient
accumulation over 2 micro-batches, global-norm clipping and an LR schedule, on a model with
uneven shapes (13 and 21 rows: uneven row shards; small buckets: several per step). Losses and
parameters must match the reference to 1e-5 (fp32); per-rank optimizer-state bytes must be
close to 1/world of the reference's (the slack is the placement's imbalance, returned and
printed; asserted below the bound stated in ``SLACK``).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from tests._harness.dist import run_distributed

ATOL = 1e-5
#: Allowed excess of the largest rank's state bytes over reference / world. Measured (printed
#: by the test): whole_tensor <= 0.7% (owners balanced on estimated state size); dim0 8% for
#: AdamW (13, 21 and 5 rows split 7/6, 11/10, 3/2), up to 32% for GaLore (the r x n basis is
#: replicated on both ranks, and the left-projected 5x21 matrix is owned whole).
SLACK = {"adamw": 0.1, "galore": 0.35, "apollo": 0.35, "frugal": 0.35}


def _matrix(rank: int, world: int) -> dict[str, object]:
    import memopt
    from memopt.optim import state_bytes
    from tests.sharding import _train as T

    results: dict[str, object] = {}
    for name in T.OPTIMIZERS:
        ref_losses, ref_model, ref_opt = T.reference(name)
        ref_bytes = state_bytes(ref_opt).total
        for stage, layout in itertools.product((1, 2), ("whole_tensor", "dim0")):
            tag = f"{name}/stage{stage}/{layout}"
            model = T.make_model()
            opt = T.make_optimizer(name, model)
            bucket = 512 if stage == 2 else 2**20
            model, sharded = memopt.shard(
                model, opt, stage=stage, layout=layout, bucket_bytes=bucket
            )
            losses = T.train(model, sharded, rank, world)
            for (pname, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
                err = (a - b).abs().max().item()
                assert err <= ATOL, f"{tag}: {pname} differs from single-process by {err:.3g}"
            worst = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
            assert worst <= ATOL, f"{tag}: losses differ by {worst:.3g}"
            mine = torch.tensor([state_bytes(sharded.inner).total], dtype=torch.float64)
            per_rank = [torch.zeros_like(mine) for _ in range(world)]
            torch.distributed.all_gather(per_rank, mine)
            results[tag] = {
                "ref_bytes": ref_bytes,
                "rank_bytes": [int(t.item()) for t in per_rank],
                "numel_slack": sharded.balance()["slack"],
            }
            sharded.remove_hooks()
    _stage2_frees_and_bf16(rank, world)
    _frozen_parameters_stay(rank, world)
    _dropped_optimizer_is_collected()
    _rank_above_the_smaller_side(rank, world)
    return results


def _rank_above_the_smaller_side(rank: int, world: int) -> None:
    """Rank 40 of a right-projected 32x48 matrix: the SVD gives 32 vectors. Row-sharded
    (dim0), the other rank allocated a 40-row basis for the owner's broadcast and failed
    ("size of tensor a (40) must match ... (32)")."""
    import memopt
    from memopt.optim import GaLoreAdamW

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Linear(48, 32, bias=False)
        group = {"params": [model.weight], "rank": 40, "proj_type": "right", "update_proj_gap": 2}
        return model, GaLoreAdamW([group], lr=1e-2)

    ref, ref_opt = build()
    model, opt = build()
    model, opt = memopt.shard(model, opt, stage=2, layout="dim0")
    # 32 samples a rank: a full-rank gradient (with fewer, the basis vectors past its rank
    # span float noise, which Adam amplifies differently in each summation order)
    x = torch.randn(3, 32 * world, 48, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        nn.functional.mse_loss(ref(x[step]), torch.zeros(32 * world, 32)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        mine = x[step][rank * 32 : (rank + 1) * 32]
        nn.functional.mse_loss(model(mine), torch.zeros(32, 32)).backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(model.weight, ref.weight, atol=1e-5, rtol=0)


def _dropped_optimizer_is_collected() -> None:
    """Stage 2's gradient hooks held the sharded optimizer strongly from the parameters (a
    cycle the collector cannot see through), so a dropped model and optimizer were never
    freed: 13 MiB per trial of a hyperparameter search. close() also removes the hooks."""
    import gc
    import weakref

    import memopt
    from tests.sharding import _train as T

    for close in (False, True):
        model = T.make_model()
        model, sharded = memopt.shard(model, T.make_optimizer("adamw", model), 2, "dim0")
        T.train(model, sharded, torch.distributed.get_rank(), 2)
        assert sharded._hooks
        if close:
            sharded.close()
            assert not sharded._hooks
        refs = weakref.ref(sharded), weakref.ref(model)
        del model, sharded
        gc.collect()
        assert all(r() is None for r in refs), f"close={close}: not freed"


def _frozen_parameters_stay(rank: int, world: int) -> None:
    """A frozen layer in the optimizer's groups (``AdamW(model.parameters())`` on a partly
    frozen model) gets no gradient, so no decay and no state, as in one process: stages 1
    and 2 used to hand it the zeros they reduce for unused parameters."""
    import memopt
    from tests.sharding import _train as T

    for stage, layout in itertools.product((1, 2), ("whole_tensor", "dim0")):
        model = T.make_model()
        first = next(model.parameters())
        first.requires_grad_(False)
        before = first.detach().clone()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model, sharded = memopt.shard(model, opt, stage=stage, layout=layout)
        T.train(model, sharded, rank, world)
        assert torch.equal(first.detach(), before), f"stage {stage}/{layout}: frozen moved"
        for plan in sharded.plans:
            if plan.param is first and plan.index in sharded.locals:
                assert not sharded.state.get(sharded.locals[plan.index]), "state for frozen"
        _unused_parameters_skip(model, sharded, rank, f"stage {stage}/{layout}")
        sharded.remove_hooks()


def _unused_parameters_skip(model, sharded, rank: int, tag: str) -> None:
    """A parameter no rank has a gradient for is skipped, as in one process (it was handed a
    reduced zero gradient, and Adam's moments moved it 8e-4 a step); one that has a gradient
    on some rank only is stepped on the average, the same on every rank."""
    before = [p.detach().clone() for p in model.parameters()]
    sharded.zero_grad()
    sharded.step()  # no gradient anywhere
    moved = [n for (n, p), b in zip(model.named_parameters(), before, strict=True)
             if not torch.equal(p, b)]  # fmt: skip
    assert not moved, f"{tag}: a step without gradients moved {moved}"
    last = model[5].weight
    if rank == 0:
        last.square().sum().backward()
    sharded.step()
    moved = [n for (n, p), b in zip(model.named_parameters(), before, strict=True)
             if not torch.equal(p, b)]  # fmt: skip
    assert moved == ["5.weight"], f"{tag}: rank {rank} moved {moved}"
    seen = [torch.zeros_like(last) for _ in range(2)]
    torch.distributed.all_gather(seen, last.detach())
    assert torch.equal(seen[0], seen[1]), f"{tag}: the ranks disagree"


def _stage2_frees_and_bf16(rank: int, world: int) -> None:
    """Stage 2 frees each gradient once sent; bf16 parameters with fp32 master shards."""
    import memopt
    from tests.sharding import _train as T

    model = T.make_model()
    model, sharded = memopt.shard(model, T.make_optimizer("adamw", model), 2, "whole_tensor")
    model(torch.randn(4, 7)).square().mean().backward()
    assert all(p.grad is None for p in model.parameters()), "stage 2 kept a sent gradient"
    sharded.finish_grad_sync()
    owned = [p for p in sharded.plans if p.owner == rank]
    assert owned and all(p.param.grad is not None for p in owned)
    sharded.step()
    model = T.make_model()
    _, stage1 = memopt.shard(model, T.make_optimizer("adamw", model), 1, "dim0")
    model(torch.randn(4, 7)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters()), "stage 1 reduces at step"
    stage1.step()
    solo = [torch.distributed.new_group([r]) for r in range(world)]  # every rank makes each
    for stage, layout in (("galore", "dim0"), ("adamw", "whole_tensor")):
        ref = T.make_model(torch.bfloat16)
        ref_opt = T.make_optimizer(stage, ref)
        ref, ref_sharded = memopt.shard(
            ref,
            ref_opt,
            2,
            layout,
            process_group=solo[rank],
            master_dtype=torch.float32,
        )
        T.train(ref, ref_sharded)  # one rank, the whole batch: the bf16 + fp32-master reference
        model = T.make_model(torch.bfloat16)
        model, sharded = memopt.shard(
            model, T.make_optimizer(stage, model), 2, layout, master_dtype=torch.float32
        )
        T.train(model, sharded, rank, world)
        assert all(t.dtype == torch.float32 for t in sharded.locals.values())
        assert all(
            v.dtype == torch.float32
            for st in sharded.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_sharded_equals_single_process() -> None:
    results = run_distributed(_matrix, world_size=2, timeout_s=120)[0]
    assert len(results) == 16
    for tag, r in sorted(results.items()):
        ideal = r["ref_bytes"] / 2
        slack = max(r["rank_bytes"]) / ideal - 1.0
        print(
            f"{tag:28s} state bytes per rank {r['rank_bytes']} (single {r['ref_bytes']}), "
            f"slack {slack:+.1%}, elements-held slack {r['numel_slack']:+.1%}"
        )
        assert slack <= SLACK[tag.split("/")[0]], f"{tag}: state slack {slack:.1%}"
