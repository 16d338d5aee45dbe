"""Stage 3 with ranks that run different FSDP2 units (a multi-task model: rank r calls
``heads[r]``). The default units make each head a unit of its own; before, rank 0's
all-gather of ``heads.0`` paired with rank 1's of ``heads.1`` and every parameter ended wrong
with no error. Now ``memopt.sharding.unit_calls`` raises on every rank: before the gather
while the first step runs, from ``backward()`` afterwards; and the documented fix (the heads
left out of the units, so they join the root) trains like one process."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import memopt
from memopt.sharding import FSDPOptions
from tests._harness.dist import run_distributed


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.heads = nn.ModuleList([nn.Linear(6, 4), nn.Linear(6, 4)])

    def forward(self, x: Tensor, task: int) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.heads[task](x)


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 4, generator=g)


def _build(units: bool = False) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = MultiTask()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fsdp = FSDPOptions(modules=list(model.layers)) if units else None
    return memopt.shard(model, opt, stage=3, fsdp=fsdp)


def _step(model: nn.Module, opt: Any, x: Tensor, y: Tensor, task: int) -> None:
    torch.nn.functional.mse_loss(model(x, task), y).backward()
    opt.step()
    opt.zero_grad()


def _locals(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def _raises(fn: Any) -> str:
    try:
        fn()
    except RuntimeError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def _diverge(rank: int, world: int) -> dict[str, Any]:
    xs, ys = _data()
    out: dict[str, Any] = {}
    # 1) the first step: caught before the mismatched all-gather, nothing changed
    model, opt = _build()
    before = _locals(model)
    out["first"] = _raises(lambda: _step(model, opt, xs[0], ys[0], task=rank))
    out["first_unchanged"] = all(torch.equal(before[n], t) for n, t in _locals(model).items())
    # 2) a later step (the early check is off): caught from backward(), before step()
    model, opt = _build()
    _step(model, opt, xs[0], ys[0], task=0)
    before = _locals(model)
    loss = torch.nn.functional.mse_loss(model(xs[1], rank), ys[1])
    out["later"] = _raises(loss.backward)
    out["later_unchanged"] = all(torch.equal(before[n], t) for n, t in _locals(model).items())
    # 3) the fix: heads left out of the units (they join the root): equals one process
    model, opt = _build(units=True)
    for i in range(3):
        _step(model, opt, xs[i][rank::world], ys[i][rank::world], task=rank)
    out["fixed"] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return out


def _reference() -> dict[str, Tensor]:
    """One process over the global batch: each rank's half with its own head."""
    xs, ys = _data()
    torch.manual_seed(0)
    model = MultiTask()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(3):
        loss = sum(
            torch.nn.functional.mse_loss(model(xs[i][r::2], r), ys[i][r::2]) for r in range(2)
        )
        (loss / 2).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def test_ranks_running_different_units_raise_on_every_rank() -> None:
    outs = run_distributed(_diverge, world_size=2, timeout_s=120)
    ref = _reference()
    for rank, out in enumerate(outs):
        assert out["first"].startswith("UnitMismatchError"), (rank, out["first"])
        assert "rank 0: 'heads.0', rank 1: 'heads.1'" in out["first"], out["first"]
        assert "FSDPOptions(modules=" in out["first"]
        assert out["first_unchanged"], rank
        assert out["later"].startswith("UnitMismatchError"), (rank, out["later"])
        assert "'heads.0'" in out["later"] and "'heads.1'" in out["later"], out["later"]
        assert out["later_unchanged"], rank
        for name, want in ref.items():
            err = (out["fixed"][name] - want).abs().max().item()
            assert err < 1e-6, f"rank {rank}: {name} differs from one process by {err:.3g}"
