"""Stages 1/2 on 2 ranks: torch's clip_grad_norm_ misuse, and the restart agreement.

- ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)`` at stage 1 scaled each rank's
  unreduced gradient by its own local coefficient, silently (the step differed from DDP +
  torch's clip). Now every rank raises, naming ``sharded_opt.clip_grad_norm_(max_norm)``;
  a scaling by one factor on every rank (``p.grad.div_(k)``, or a clip that changes nothing)
  still works.
- A rank whose backward after a finished sync touched no parameter (the restart path of
  ``regrad``) did not join the others' restart: the ranks hung. Now they agree.
"""

from __future__ import annotations

import torch
from torch import nn

import memopt
from tests._harness.dist import run_distributed

BATCH = 4
LAYOUTS = ("whole_tensor", "dim0")


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).pow(2).mean() + self.b(x).pow(2).mean()


def _build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Two()
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)


def _batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(1))
    x[: BATCH // 2] *= 5.0  # rank 0's half: a far larger local norm than rank 1's
    per = BATCH // world
    return x, x[rank * per : (rank + 1) * per]


def _max_err(model: nn.Module, ref: nn.Module) -> float:
    return max(
        (a - b).abs().max().item()
        for a, b in zip(model.parameters(), ref.parameters(), strict=True)
    )


def _torch_clip(rank: int, world: int, layout: str, max_norm: float, scale: float) -> str:
    """Stage 1, torch's clip (or an in-place scale alike on every rank) between backward and
    step()."""
    x, mine = _batch(rank, world)
    ref, ref_opt = _build()
    ref(x).backward()
    if scale != 1.0:
        for i, p in enumerate(ref.parameters()):  # (a per-tensor factor, alike on every rank)
            assert p.grad is not None
            p.grad.mul_(scale * (1 + 0.25 * i))
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ref_opt.step()
    model, opt = _build()
    model, sharded = memopt.shard(model, opt, stage=1, layout=layout)
    try:
        model(mine).backward()
        if scale != 1.0:
            for i, p in enumerate(model.parameters()):
                assert p.grad is not None
                p.grad.mul_(scale * (1 + 0.25 * i))
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        sharded.step()
    except RuntimeError as exc:
        return str(exc)
    finally:
        sharded.close()
    return f"no error, off by {_max_err(model, ref):.3g}"


def _silent_rank(rank: int, world: int, stage: int, layout: str) -> float:
    """Clip, skip with model.zero_grad(); the next backward touches nothing on rank 1."""
    x, mine = _batch(rank, world)
    ref, ref_opt = _build()
    (ref(x[: BATCH // world]) / world).backward()  # rank 1 contributes zeros
    ref_opt.step()
    model, opt = _build()
    model, sharded = memopt.shard(model, opt, stage=stage, layout=layout)
    model(mine).backward()
    sharded.clip_grad_norm_(1e3)
    model.zero_grad()
    if rank == 0:
        model(mine).backward()
    else:
        (torch.zeros((), requires_grad=True) * 2.0).backward()  # no parameter in the graph
    sharded.step()
    sharded.close()
    return _max_err(model, ref)


def _ranks(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for layout in LAYOUTS:
        out[f"clip {layout}"] = _torch_clip(rank, world, layout, 0.05, 1.0)
        out[f"div {layout}"] = _torch_clip(rank, world, layout, 1e6, 0.5)
        for stage in (1, 2):
            out[f"silent {stage} {layout}"] = _silent_rank(rank, world, stage, layout)
    return out


def test_torch_clip_refused_and_silent_rank_agrees() -> None:
    for got in run_distributed(_ranks, world_size=2, timeout_s=120):
        for layout in LAYOUTS:
            msg = str(got[f"clip {layout}"])
            assert "sharded_opt.clip_grad_norm_(max_norm)" in msg, (layout, msg)
            assert "torch.nn.utils.clip_grad_norm_" in msg, msg
            div = str(got[f"div {layout}"])
            assert div.startswith("no error"), div  # one factor on every rank: allowed
            off = float(div.rsplit(" ", 1)[1])
            assert off <= 1e-6, (layout, off)
            for stage in (1, 2):
                err = got[f"silent {stage} {layout}"]
                assert isinstance(err, float) and err <= 1e-6, (stage, layout, err)
