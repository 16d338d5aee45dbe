"""Shared pieces of the sharding tests: a small model with uneven shapes, the four
optimizers, and one training loop used by both the single-process reference and the ranks.

The loop: 10 steps; each global batch of 8 samples is 2 micro-batches of 4 (gradient
accumulation; the loss is scaled by 1/2); a rank takes its ``4 / world`` samples of each
micro-batch; gradients are clipped to a global norm of 0.5; a LambdaLR decays the LR.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

import memopt
from memopt.optim import AdamW, ApolloAdamW, FrugalAdamW, GaLoreAdamW

OPTIMIZERS = ("adamw", "galore", "apollo", "frugal")
STEPS, MICRO, MICRO_BATCH, MAX_NORM = 10, 2, 4, 0.5


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # weights 13x7 and 21x13 (right-projected: row-sharded under dim0), 5x21 (left-projected:
    # owned whole under dim0), LayerNorm and biases (1-D, row-sharded)
    model = nn.Sequential(
        nn.Linear(7, 13),
        nn.Tanh(),
        nn.Linear(13, 21),
        nn.Tanh(),
        nn.LayerNorm(21),
        nn.Linear(21, 5),
    )
    return model.to(dtype)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    low: dict[str, Any] = {"params": mats, "rank": 3, "update_proj_gap": 4}
    if name == "adamw":
        return AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if name == "adamw-int8":
        return AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, state_dtype="int8")
    if name == "galore":
        return GaLoreAdamW([low, {"params": rest}], lr=1e-2, weight_decay=0.01)
    if name == "apollo":
        return ApolloAdamW([low, {"params": rest}], lr=1e-2)
    if name == "frugal":
        return FrugalAdamW([{**low, "proj": "orthogonal"}, {"params": rest}], lr=1e-2)
    raise ValueError(name)


def batches(dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = MICRO * MICRO_BATCH
    return [
        (torch.randn(n, 7, generator=g).to(dtype), torch.randn(n, 5, generator=g).to(dtype))
        for _ in range(STEPS)
    ]


def train(
    model: nn.Module, opt: torch.optim.Optimizer, rank: int = 0, world: int = 1
) -> list[float]:
    """Run the loop; return the global loss per step (the mean over ranks)."""
    sharded = isinstance(opt, memopt.sharding.ShardedOptimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    per = MICRO_BATCH // world
    losses = []
    for x, y in batches(next(model.parameters()).dtype):
        total = torch.zeros(())
        for mb in range(MICRO):
            lo = mb * MICRO_BATCH + rank * per
            out = model(x[lo : lo + per])
            loss = nn.functional.mse_loss(out.float(), y[lo : lo + per].float()) / MICRO
            quiet = sharded and mb < MICRO - 1
            with opt.no_sync() if quiet else nullcontext():  # type: ignore[attr-defined]
                loss.backward()
            total += loss.detach()
        if sharded:
            opt.clip_grad_norm_(MAX_NORM)  # type: ignore[attr-defined]
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        sched.step()
        opt.zero_grad()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def reference(name: str, dtype: torch.dtype = torch.float32) -> tuple[list[float], nn.Module, Any]:
    """The single-process run: losses, the trained model and its optimizer."""
    model = make_model(dtype)
    opt = make_optimizer(name, model)
    return train(model, opt), model, opt
