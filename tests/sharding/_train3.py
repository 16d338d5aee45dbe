"""Pieces of the stage-3 tests: a tiny transformer-like model with ``ModuleList`` blocks (the
default FSDP2 wrapping policy's units) and uneven shapes, and its training loop.

Shapes: ``inp`` 13x7 and ``blocks.0.up`` 21x13 and ``blocks.1.down`` 13x9 are right-projected
(row-sharded updates); ``blocks.0.down`` 13x21, ``blocks.1.up`` 9x13 and ``head`` 5x13 are
left-projected (stepped whole by an owner rank); LayerNorms and biases are 1-D row shards.
The loop is ``_train.train``'s: 10 steps, 2 micro-batches (accumulation), clipping to 0.5,
a LambdaLR.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from tests.sharding import _train as T


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(7, 13)
        self.blocks = nn.ModuleList([Block(13, 21), Block(13, 9)])
        self.head = nn.Linear(13, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return Net().to(dtype)


def train(model: nn.Module, opt: Any, rank: int = 0, world: int = 1) -> list[float]:
    """``_train.train`` for any optimizer with ``no_sync``/``clip_grad_norm_`` (or a plain one)."""
    sharded = hasattr(opt, "no_sync")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    per = T.MICRO_BATCH // world
    # a stage-3 model in mixed precision holds fp32 shards; FSDP2 casts its inputs to bf16
    dtype = next(model.parameters()).dtype
    losses = []
    for x, y in T.batches(dtype):
        total = torch.zeros(())
        for mb in range(T.MICRO):
            lo = mb * T.MICRO_BATCH + rank * per
            quiet = sharded and mb < T.MICRO - 1
            with opt.no_sync() if quiet else nullcontext():
                out = model(x[lo : lo + per])
                loss = nn.functional.mse_loss(out.float(), y[lo : lo + per].float()) / T.MICRO
                loss.backward()
            total += loss.detach()
        if sharded:
            opt.clip_grad_norm_(T.MAX_NORM)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), T.MAX_NORM)
        opt.step()
        sched.step()
        opt.zero_grad()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter at full size (``full_tensor()`` of DTensors: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def reference_losses(name: str) -> list[float]:
    """The single-process losses of ``make_model`` under ``name``'s optimizer."""
    model = make_model()
    return train(model, T.make_optimizer(name, model))
