"""Stage 3 with ``offload=`` on a bf16 model, torch AdamW, no ``master_dtype``: 2 ranks keep
fp32 masters, like stages 1/2 and like one rank (``fsdp.offload_masters``). Before, 2 ranks
stepped the bf16 weights directly (1.95e-3 from the fp32-master run after 6 steps) while one
rank used fp32 masters. Every rank trains on the same batch, so any gap is the arithmetic."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import memopt
from tests._harness.dist import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16)


def _data(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=g).bfloat16(), torch.randn(8, 4, generator=g).bfloat16()


def _loss(model: nn.Module, step: int) -> Tensor:
    x, y = _data(step)
    return nn.functional.mse_loss(model(x).float(), y.float())


def _sharded(rank: int, world: int) -> dict[str, Any]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = memopt.shard(model, opt, stage=3, offload="cpu")
    for step in range(6):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    held = {n: p.dtype for n, p in model.named_parameters()}
    full = [p.full_tensor().detach().to(torch.bfloat16) for p in model.parameters()]
    opt.close()
    return {"held": held, "full": full}


def _fp32_master_reference() -> list[Tensor]:
    model = _model()
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    opt = torch.optim.AdamW(masters, lr=1e-2)
    for step in range(6):
        _loss(model, step).backward()
        for p, m in zip(model.parameters(), masters, strict=True):
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters, strict=True):
                p.copy_(m)
    return [p.detach() for p in model.parameters()]


def test_stage3_offload_keeps_fp32_masters_on_several_ranks() -> None:
    outs = run_distributed(_sharded, world_size=2, timeout_s=120)
    ref = _fp32_master_reference()
    for rank, out in enumerate(outs):
        assert set(out["held"].values()) == {torch.float32}, out["held"]  # the masters
        for got, want in zip(out["full"], ref, strict=True):
            err = (got.float() - want.float()).abs().max().item()
            assert err == 0.0, f"rank {rank}: {err:.3g} from the fp32-master run"
