"""Pieces of the checkpoint tests: a tiny model with dropout, optimizers, a deterministic loop.

Shapes: ``inp`` 64x8 (row-shardable, and 64x64 ``mid`` has 4096 elements so 8-bit state is
really quantized), ``out`` 5x64 (fewer rows than some layouts like: owned whole under dim0 at
world size 2 is fine, 5 rows split 3+2). Dropout makes the loop consume the torch RNG, so a
resume is exact only if the RNG state is restored too.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

import memopt
from memopt.optim import (
    AdamW,
    ApolloAdamW,
    ApolloMini,
    FrugalAdamW,
    GaLoreAdamW,
    NaturalGaLoreAdamW,
)

BATCH = 8


class Net(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 64)
        self.norm = nn.LayerNorm(64)
        self.mid = nn.Linear(64, 64)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.inp(x)))
        return self.out(self.drop(torch.tanh(self.mid(h))))


def make_model(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return Net(dropout)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    # gap 4 with saves at step 3: the first step after a resume is not a refresh (a seeded
    # basis must come back from the load itself, not from the next refresh)
    low: dict[str, Any] = {"params": mats, "rank": 4, "update_proj_gap": 4}
    if name == "adamw":
        return AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if name == "torch_adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if name == "adamw8":
        return AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    if name == "galore":
        return GaLoreAdamW([low, {"params": rest}], lr=1e-2, weight_decay=0.01)
    if name == "galore8":
        return GaLoreAdamW([low, {"params": rest}], lr=1e-2, state_dtype="int8")
    if name == "apollo_mini":
        return ApolloMini([{**low, "rank": 1}, {"params": rest}], lr=1e-2)
    if name == "apollo":
        return ApolloAdamW([low, {"params": rest}], lr=1e-2)
    if name == "natural_galore":
        return NaturalGaLoreAdamW([low, {"params": rest}], lr=1e-2)
    if name == "frugal":
        return FrugalAdamW([{**low, "proj": "orthogonal"}, {"params": rest}], lr=1e-2)
    raise ValueError(name)


def make_all(
    name: str, stage: int = 0, layout: str | None = None, dropout: float = 0.1
) -> tuple[Any, Any, Any]:
    """Model, optimizer (sharded when ``stage``), LambdaLR scheduler."""
    model = make_model(dropout)
    opt: Any = make_optimizer(name, model)
    if stage:
        model, opt = memopt.shard(model, opt, stage=stage, layout=layout)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    return model, opt, sched


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 5, generator=g)


def train(
    model: nn.Module, opt: Any, sched: Any, start: int, end: int, rank: int = 0, world: int = 1
) -> None:
    per = BATCH // world
    for step in range(start, end):
        x, y = batch(step)
        out = model(x[rank * per : (rank + 1) * per])
        nn.functional.mse_loss(out, y[rank * per : (rank + 1) * per]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter, whole (DTensors gathered), cloned."""
    out = {}
    for n, p in model.state_dict().items():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().clone()
    return out


def equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    """Names whose tensors differ in any bit."""
    return [n for n in a if not torch.equal(a[n], b[n])]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    return e
