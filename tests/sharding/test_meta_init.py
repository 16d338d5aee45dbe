"""Stage 3 from a meta-device model: shards materialized module by module, values as if eager.

A model built under ``torch.device("meta")`` with the same seed as an eager build gets, after
``memopt.shard(stage=3)``, exactly the eager build's parameters (each rank initializes one
module at a time at full size and keeps its rows), then trains like the single-process run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt
from memopt.sharding import FSDPOptions
from memopt.sharding.meta_init import is_meta
from tests._harness.dist import run_distributed
from tests.sharding import _train as T
from tests.sharding import _train3 as T3


def _meta_model() -> nn.Module:
    torch.manual_seed(0)
    with torch.device("meta"):
        return T3.Net()


def _meta_run(name: str, rank: int, world: int) -> None:
    ref = T3.make_model()
    eager = T3.full_params(ref)
    ref_losses = T3.train(ref, T.make_optimizer(name, ref))
    model = _meta_model()
    model, sharded = memopt.shard(model, T.make_optimizer(name, model), stage=3)
    assert not is_meta(model)
    for pname, p in model.named_parameters():  # nothing above the local rows was allocated
        assert p.to_local().shape[0] <= -(-p.shape[0] // world), pname
    start = T3.full_params(model)
    for pname, b in eager.items():
        assert torch.equal(start[pname], b), f"{name}: {pname} initialized differently"
    losses = T3.train(model, sharded, rank, world)
    full = T3.full_params(model)
    for pname, b in ref.named_parameters():
        assert (full[pname] - b).abs().max().item() <= 1e-5, f"{name}: {pname}"
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5


def _custom_init(rank: int, world: int) -> None:
    def init(m: nn.Module) -> None:
        for p in m.parameters(recurse=False):
            p.fill_(0.25 if p.dim() == 2 else -1.0)

    model = _meta_model()
    model, _ = memopt.shard(
        model, T.make_optimizer("adamw", model), stage=3, fsdp=FSDPOptions(init_fn=init)
    )
    for pname, p in T3.full_params(model).items():
        assert torch.all(p == (0.25 if p.dim() == 2 else -1.0)), pname


def _all(rank: int, world: int) -> None:
    for name in ("adamw", "galore"):
        _meta_run(name, rank, world)
    _custom_init(rank, world)


def test_meta_model_stage3_equals_eager_build() -> None:
    run_distributed(_all, world_size=2, timeout_s=120)


def test_meta_model_world_size_one() -> None:
    ref = T3.make_model()
    ref_losses = T3.train(ref, T.make_optimizer("apollo", ref))
    model = _meta_model()
    model, sharded = memopt.shard(model, T.make_optimizer("apollo", model), stage=3)
    assert not is_meta(model)
    assert T3.train(model, sharded) == ref_losses
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


class _NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 4))


def test_meta_model_errors() -> None:
    model = _meta_model()
    opt = T.make_optimizer("adamw", model)
    with pytest.raises(ValueError, match="only stage 3 materializes"):
        memopt.shard(model, opt, stage=2)
    with torch.device("meta"):
        bare = nn.Sequential(nn.Linear(4, 4), _NoReset())
    with pytest.raises(ValueError, match=r"no reset_parameters.*init_fn"):
        memopt.shard(bare, torch.optim.AdamW(bare.parameters()), stage=3)
    mixed = _meta_model()
    mixed.head = nn.Linear(13, 5)
    with pytest.raises(ValueError, match="several devices .*meta"):
        memopt.shard(mixed, torch.optim.AdamW(mixed.parameters()), stage=3)
    with pytest.raises(ValueError, match="cannot be 'meta'"):
        FSDPOptions(init_device="meta")
