"""Stages 1/2 gradient bookkeeping between steps equals one process over the global batch.

- ``zero_grad(set_to_none=False)``: a parameter with a gradient keeps a zero one, so on a
  step where it is unused AdamW still moves it (momentum, weight decay). Stages 1/2 freed
  ``.grad`` when sending it and then skipped the parameter (0.125 off after 3 steps).
- Skipping a batch with ``model.zero_grad()`` after ``sharded_opt.clip_grad_norm_()``: the
  next step used the skipped batch's clipped gradient (stage 1), or stage 2 refused the
  next backward with an "arrived twice" error naming causes that did not apply.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

import memopt
from tests._harness.dist import run_distributed

BATCH = 4  # global samples a step
CASES = list(itertools.product((1, 2), ("whole_tensor", "dim0")))


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        out = self.a(x).pow(2).mean()
        return out + self.b(x).pow(2).mean() if use_b else out


def _build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Two()
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)


def _zero_grad_false(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> None:
    """``b`` used on step 0 only; zero_grad(set_to_none=False) after every step."""
    per = BATCH // world
    for step in range(3):
        x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(step))
        model(x[rank * per : (rank + 1) * per], use_b=step == 0).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)


def _clip_then_skip(
    model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int, clip: bool
) -> None:
    """Step 1 is skipped with ``model.zero_grad()`` after the clip (the global norm)."""
    per = BATCH // world
    for step in range(4):
        x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(step))
        model(x[rank * per : (rank + 1) * per], use_b=True).backward()
        if clip:
            if isinstance(opt, memopt.sharding.ShardedOptimizer):
                opt.clip_grad_norm_(0.05)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if step == 1:
            model.zero_grad()
            continue
        opt.step()
        opt.zero_grad()


def _compare(
    run: Callable[..., None],
    rank: int,
    world: int,
    tag: str,
    stages: tuple[int, ...] = (1, 2),
    **kw: object,
) -> None:
    ref, ref_opt = _build()
    run(ref, ref_opt, 0, 1, **kw)
    for stage, layout in [c for c in CASES if c[0] in stages]:
        model, opt = _build()
        model, sharded = memopt.shard(model, opt, stage=stage, layout=layout)
        run(model, sharded, rank, world, **kw)
        for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
            err = (a - b).abs().max().item()
            assert err <= 1e-6, f"{tag} stage {stage} {layout}: {name} off by {err:.3g}"
        sharded.close()


def _stage2_skip_without_clip(rank: int, world: int) -> str:
    """No clip before the skip: stage 2 cannot tell it from accumulation outside no_sync,
    so it still refuses, now naming the skip and its fix too."""
    model, opt = _build()
    model, sharded = memopt.shard(model, opt, stage=2, layout="dim0")
    try:
        _clip_then_skip(model, sharded, rank, world, clip=False)
    except RuntimeError as exc:
        return str(exc)
    finally:
        sharded.close()
    return "no error"


def _not_zeroed(rank: int, world: int, stage: int) -> str:
    """A backward after the clip with nothing zeroed would add onto the synchronized
    gradient of a parameter stepped in place: every rank raises, naming the fix."""
    model, opt = _build()
    # whole_tensor: each rank steps some parameters themselves (their .grad is the reduced one)
    model, sharded = memopt.shard(model, opt, stage=stage, layout="whole_tensor")
    per = BATCH // world
    x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(0))[rank * per :][:per]
    try:
        model(x, use_b=True).backward()
        sharded.clip_grad_norm_(1.0)
        model(x, use_b=True).backward()
        sharded.step()
    except RuntimeError as exc:
        return str(exc)
    finally:
        sharded.close()
    return "no error"


def _ranks(rank: int, world: int) -> dict[str, str]:
    _compare(_zero_grad_false, rank, world, "zero_grad(set_to_none=False)")
    _compare(_clip_then_skip, rank, world, "clip then model.zero_grad() skip", clip=True)
    _compare(_clip_then_skip, rank, world, "skip, no clip", stages=(1,), clip=False)
    return {
        "noclip2": _stage2_skip_without_clip(rank, world),
        "nozero1": _not_zeroed(rank, world, 1),
        "nozero2": _not_zeroed(rank, world, 2),
    }


def _check_errors(got: dict[str, str]) -> None:
    assert "arrived twice" in got["noclip2"], got["noclip2"]
    assert "sharded_opt.zero_grad()" in got["noclip2"], got["noclip2"]
    for key in ("nozero1", "nozero2"):
        assert "still holds the synchronized gradient" in got[key], got[key]
        assert "sharded_opt.zero_grad()" in got[key], got[key]


def test_two_ranks_match_one_process() -> None:
    for got in run_distributed(_ranks, world_size=2, timeout_s=120):
        _check_errors(got)


@pytest.mark.parametrize("stage", [1, 2])
def test_world_size_one(stage: int) -> None:
    """The plain path (no process group) had both bugs too (dim0 locals are row views)."""
    ref, ref_opt = _build()
    _zero_grad_false(ref, ref_opt, 0, 1)
    ref2, ref2_opt = _build()
    _clip_then_skip(ref2, ref2_opt, 0, 1, clip=True)
    for layout in ("whole_tensor", "dim0"):
        for run, want, kw in (
            (_zero_grad_false, ref, {}),
            (_clip_then_skip, ref2, {"clip": True}),
        ):
            model, opt = _build()
            model, sharded = memopt.shard(model, opt, stage=stage, layout=layout)
            run(model, sharded, 0, 1, **kw)
            for (name, a), b in zip(model.named_parameters(), want.parameters(), strict=True):
                assert torch.equal(a, b), f"{run.__name__} stage {stage} {layout}: {name}"


def _backward_onto_clipped(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(0))
    model(x, use_b=True).backward()
    if isinstance(opt, memopt.sharding.ShardedOptimizer):
        opt.clip_grad_norm_(0.05)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    model(x, use_b=True).backward()
    opt.step()


@pytest.mark.parametrize("layout", ["whole_tensor", "dim0"])
def test_world_size_one_backward_onto_clipped(layout: str) -> None:
    """One process adds a backward after the clip onto the clipped gradients; so does the
    plain path (the gradients stay on ``param.grad``): no error, the same bits."""
    ref, ref_opt = _build()
    _backward_onto_clipped(ref, ref_opt)
    model, opt = _build()
    model, sharded = memopt.shard(model, opt, stage=1, layout=layout)
    _backward_onto_clipped(model, sharded)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
