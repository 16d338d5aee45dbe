"""Stage 3, bf16 weights with fp32 masters (FSDP2 reduces in fp32), an accumulation window
whose first backward runs inside ``no_sync()``: a parameter that one rank never uses gets a
zero gradient there (``fsdp2_internals.UnusedGrads``) beside unit-mates whose gradients FSDP2
accumulated in fp32. The zero was bf16, and FSDP2's reduce-scatter refused the unit
("expects uniform gradient dtype but got {bfloat16, float32}") on the documented loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import memopt
from tests._harness.dist import run_distributed
from tests.sharding.test_nosync_window import _Block


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor, branch: bool) -> Tensor:
        return self.head(self.blocks[1](self.blocks[0](x, False), branch)).float().pow(2).mean()


def _ranks(rank: int, world: int) -> dict[str, float]:
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = _Net().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model, sharded = memopt.shard(model, opt, stage=3, master_dtype=torch.float32)
    try:
        for step in range(2):
            for micro in range(2):  # N = 2: the first under no_sync, the second reduces
                x = torch.randn(3, 6, generator=torch.Generator().manual_seed(step * 10 + micro))
                loss = model(x.to(torch.bfloat16), rank == 1) / 2  # only rank 1 uses side
                with sharded.no_sync() if micro == 0 else torch.enable_grad():
                    loss.backward()
            sharded.step()
            sharded.zero_grad()
        out = {}
        for n, p in model.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[n] = float((full.detach().float() - before[n].float()).abs().max())
        return out
    finally:
        sharded.close()


def test_unused_param_beside_fp32_accumulated_grads() -> None:
    got = run_distributed(_ranks, world_size=2, timeout_s=120)
    assert got[0] == got[1]
    moved = got[0]
    assert moved["blocks.1.side.weight"] > 1e-3  # rank 1's gradient reached it
    assert moved["blocks.0.side.weight"] == 0.0  # no rank used it: no step at all
    assert moved["blocks.1.lin.weight"] > 1e-3
