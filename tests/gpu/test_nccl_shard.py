"""memopt.shard over NCCL on CUDA tensors (skipped without CUDA).

On one GPU, ``MEMOPT_SHARD_WORLD1_COLLECTIVES=1`` sends a world-size-1 NCCL group through the
sharded code path (device buckets, post-accumulate-grad hooks, NCCL reduce-scatter /
all-gather, FSDP2 for stage 3), to be checked against the plain single-GPU run; with two or
more GPUs, two NCCL ranks split the batch and must match one GPU on the whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import memopt
from tests._harness.dist import run_distributed

pytestmark = pytest.mark.gpu

STEPS, BATCH = 6, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    blocks = nn.ModuleList(
        nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 48)) for _ in range(2)
    )
    return nn.Sequential(nn.Linear(16, 48), *blocks, nn.Linear(48, 8)).cuda()


def _opt(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return memopt.optim.AdamW(model.parameters(), lr=1e-2)
    groups = memopt.optim.param_groups(model, target="all-linear", rank=8, update_proj_gap=3)
    return memopt.optim.GaLoreAdamW(groups, lr=1e-2)


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> list[float]:
    g = torch.Generator().manual_seed(7)
    per, losses = BATCH // world, []
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 8, generator=g)
        x, y = x[rank * per : (rank + 1) * per].cuda(), y[rank * per : (rank + 1) * per].cuda()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _ranks(rank: int, world: int) -> dict[str, float]:
    torch.cuda.set_device(rank)
    if world == 1:
        os.environ["MEMOPT_SHARD_WORLD1_COLLECTIVES"] = "1"
    worst = {}
    for name in ("adamw", "galore"):
        ref = _model()
        ref_losses = _train(ref, _opt(name, ref), 0, 1)
        for stage in (1, 2, 3):
            model = _model()
            model, sharded = memopt.shard(model, _opt(name, model), stage)
            assert not getattr(sharded, "_plain", False)
            losses = _train(model, sharded, rank, world)
            worst[f"{name}/stage{stage}"] = max(
                abs(a - b) for a, b in zip(losses, ref_losses, strict=True)
            )
    return worst


def test_nccl_one_gpu_sharded_path_equals_plain() -> None:
    worst = run_distributed(_ranks, world_size=1, backend="nccl", timeout_s=300)[0]
    print("NCCL world 1, forced sharded path, worst loss difference:", worst)
    assert all(v <= 1e-5 for v in worst.values()), worst


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_two_gpus_equal_one() -> None:
    worst = run_distributed(_ranks, world_size=2, backend="nccl", timeout_s=300)[0]
    print("NCCL world 2, worst loss difference against one GPU:", worst)
    assert all(v <= 1e-4 for v in worst.values()), worst
