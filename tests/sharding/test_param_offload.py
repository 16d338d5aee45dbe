"""Stage 3 with ``offload_params="cpu"`` (FSDP2's CPUOffloadPolicy under memopt's optimizer)
equals the single-process run; the policy is really installed on every unit."""

from __future__ import annotations

import torch

import memopt
from tests._harness.dist import run_distributed
from tests.sharding import _train as T
from tests.sharding import _train3 as T3


def _run(rank: int, world: int) -> list[str]:
    from torch.distributed.fsdp import CPUOffloadPolicy

    ref = T3.make_model()
    ref_losses = T3.train(ref, T.make_optimizer("galore", ref))
    model = T3.make_model()
    model, sharded = memopt.shard(
        model, T.make_optimizer("galore", model), stage=3, offload_params="cpu"
    )
    policies = [type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
                for m in (*model.blocks, model)]  # fmt: skip
    assert all(p == CPUOffloadPolicy.__name__ for p in policies), policies
    losses = T3.train(model, sharded, rank, world)
    full = T3.full_params(model)
    for name, b in ref.named_parameters():
        assert (full[name] - b).abs().max().item() <= 1e-5, name
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-5
    return policies


def test_stage3_cpu_param_offload_equals_single_process() -> None:
    run_distributed(_run, world_size=2, timeout_s=90)


def _one_rank(rank: int, world: int) -> bool:
    model = T3.make_model()
    model, sharded = memopt.shard(
        model, T.make_optimizer("adamw", model), stage=3, offload_params="cpu"
    )
    return isinstance(sharded, memopt.sharding.FSDPOptimizer)


def test_one_rank_param_offload_still_runs_fsdp2() -> None:
    assert run_distributed(_one_rank, world_size=1, timeout_s=60) == [True]


def test_param_offload_config_errors() -> None:
    import pytest

    model = T3.make_model()
    with pytest.raises(ValueError, match="applies to stage 3"):
        memopt.shard(model, T.make_optimizer("adamw", model), stage=2, offload_params="cpu")
    with pytest.raises(ValueError, match="needs param_nvme="):
        memopt.shard(model, T.make_optimizer("adamw", model), stage=3, offload_params="nvme")
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        memopt.shard(model, T.make_optimizer("adamw", model), stage=3, offload_params="cpu")
    with pytest.raises(ValueError, match="'none', 'cpu' or 'nvme'"):
        memopt.shard(model, T.make_optimizer("adamw", model), stage=3, offload_params="gpu")
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
