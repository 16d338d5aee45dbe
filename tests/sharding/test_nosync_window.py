"""Accumulation windows that do not end on a synchronizing backward, at stages 1/2/3.

Every loop is compared with one process over the global batch (AdamW, lr 1e-2: a gradient
lost or carried into the next step moves a weight by ~lr):

- ``uneven``: 5 micro-batches with N=2 under ``quiet = (i + 1) % N != 0``, and a step for the
  leftover window at the end of the epoch, so its only backward ran inside ``no_sync()``;
  stage 3 skipped that step and carried its gradient into the next one. The leftover window
  also clips, and uses a branch on rank 1 only.
- ``skip``: one micro-batch inside ``no_sync()``, then the batch is skipped with
  ``sharded_opt.zero_grad()``; stage 3 kept the unsharded gradient and added it to the next.
- ``late``: the synchronizing backward first, then two inside ``no_sync()`` (an inverted
  condition); stage 2 silently dropped the later two, stage 3 carried them over.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

import memopt
from tests._harness.dist import run_distributed

CASES = [(1, "dim0"), (2, "dim0"), (2, "whole_tensor"), (3, "dim0")]
CLIP = 0.3


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.side = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: Tensor, branch: bool) -> Tensor:
        h = torch.tanh(self.lin(x))
        return h + self.side(x) if branch else h


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))  # two FSDP2 units + the root
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor, branch: bool) -> Tensor:
        return self.head(self.blocks[1](self.blocks[0](x, False), branch)).pow(2).mean()


def _build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _data(micro: int, rank: int) -> Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(10 * micro + rank))


# loop -> list of (micro-batches inside no_sync, the synchronizing one or None, then: step |
# clip+step | skip); micro-batches are numbered over the whole loop
LOOPS: dict[str, list[tuple[list[int], list[int], str]]] = {
    "uneven": [([0], [1], "step"), ([2], [3], "step"), ([4], [], "clip"), ([5], [6], "step")],
    "skip": [([0], [], "skip"), ([1], [2], "step")],
    "late": [([], [0], "late"), ([3], [4], "step")],
}


def _run(loop: str, model: nn.Module, opt: Any, ranks: list[int]) -> list[float]:
    """``ranks``: the ranks' data this process runs (all of them: the one-process reference)."""
    sharded = not isinstance(opt, torch.optim.AdamW)
    norms = []
    for quiet, sync, then in LOOPS[loop]:
        order = [(m, True) for m in quiet] + [(m, False) for m in sync]
        if then == "late":  # the synchronizing backward first, then two under no_sync
            order = [(0, False), (1, True), (2, True)]
        for micro, q in order:
            for r in ranks:
                branch = r == 1 and micro == 4
                # (the ranks average their gradients: the one-process sum is divided too)
                loss = model(_data(micro, r), branch) / (2 * len(ranks))
                with opt.no_sync() if q and sharded else nullcontext():
                    loss.backward()
        if then == "skip":
            opt.zero_grad()
            continue
        if then == "clip":
            if sharded:
                norms.append(float(opt.clip_grad_norm_(CLIP)))
            else:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
    return norms


def _full(model: nn.Module) -> list[Tensor]:
    from torch.distributed.tensor import DTensor

    return [
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def _ranks(rank: int, world: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for loop in LOOPS:
        ref, ref_opt = _build()
        ref_norms = _run(loop, ref, ref_opt, list(range(world)))
        for stage, layout in CASES:
            model, opt = _build()
            model, sharded = memopt.shard(model, opt, stage=stage, layout=layout)
            norms = _run(loop, model, sharded, [rank])
            got = _full(model)
            err = max(
                (a - b).abs().max().item() for a, b in zip(got, ref.parameters(), strict=True)
            )
            for a, b in zip(norms, ref_norms, strict=True):
                err = max(err, abs(a - b))
            out[f"{loop} stage {stage} {layout}"] = err
            sharded.close()
    return out


def test_windows_match_one_process() -> None:
    for got in run_distributed(_ranks, world_size=2, timeout_s=150):
        bad = {k: v for k, v in got.items() if not v <= 1e-6}
        assert not bad, f"off the one-process run over the global batch: {bad}"
