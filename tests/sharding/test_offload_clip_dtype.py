"""bf16 parameters, ``master_dtype=torch.float32``, ``offload="cpu"``: ``clip_grad_norm_``'s norm
is the in-memory path's (the exact norm of the reduced gradient, in fp32).

The offloaded optimizer steps the model's bf16 shards, so the clip saw bf16 gradients and
``torch._foreach_norm`` returned bf16 per-tensor norms: the global norm (what users log and
test for non-finite values) was off by up to 6.5e-4 relative. The in-memory path's locals are
fp32 masters holding the upcast gradient.
"""

from __future__ import annotations

import torch
from torch import nn

import memopt
from tests._harness.dist import run_distributed


def _norm(rank: int, stage: int, layout: str, offload: str | None) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(torch.bfloat16)
    opt = memopt.optim.AdamW(model.parameters(), lr=1e-2)
    model, sharded = memopt.shard(
        model, opt, stage=stage, layout=layout, master_dtype=torch.float32, offload=offload
    )
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 16, generator=g).to(torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    norm = sharded.clip_grad_norm_(0.5)
    sharded.step()
    sharded.close()
    return norm


def _ranks(rank: int, world: int) -> list[tuple[str, float, float, str]]:
    out = []
    for stage, layout in ((1, "whole_tensor"), (2, "dim0")):
        ref = _norm(rank, stage, layout, None)
        got = _norm(rank, stage, layout, "cpu")
        out.append((f"stage {stage} {layout}", ref.item(), got.item(), str(got.dtype)))
    return out


def test_offloaded_bf16_clip_norm_is_the_in_memory_one() -> None:
    for got in run_distributed(_ranks, world_size=2, timeout_s=120):
        for case, ref, norm, dtype in got:
            assert dtype == "torch.float32", (case, dtype)
            assert abs(norm - ref) <= 1e-6 * ref, f"{case}: offload {norm!r}, in memory {ref!r}"
