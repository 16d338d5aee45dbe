"""World size 1 (no process group) runs the plain single-process arithmetic, bit for bit."""

from __future__ import annotations

import pytest
import torch

import memopt
from tests.sharding import _train as T


@pytest.mark.parametrize("name", T.OPTIMIZERS)
def test_world_size_one_is_the_plain_path(name: str) -> None:
    ref_losses, ref_model, ref_opt = T.reference(name)
    for stage in (1, 2):
        for layout in ("whole_tensor", "dim0"):
            model = T.make_model()
            model, sharded = memopt.shard(model, T.make_optimizer(name, model), stage, layout)
            assert T.train(model, sharded) == ref_losses
            for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
                assert torch.equal(a, b), f"{name} stage {stage} {layout}"
            sd = sharded.state_dict()
            assert sd["sharding"]["world_size"] == 1
            assert sd["state"].keys() == ref_opt.state_dict()["state"].keys()


def test_state_dict_round_trip() -> None:
    model = T.make_model()
    model, sharded = memopt.shard(model, T.make_optimizer("galore", model), 2, "dim0")
    T.train(model, sharded)
    sd = sharded.state_dict()
    model2 = T.make_model()
    model2.load_state_dict(model.state_dict())
    _, again = memopt.shard(model2, T.make_optimizer("galore", model2), 2, "dim0")
    again.load_state_dict(sd)
    torch.testing.assert_close(again.state_dict()["state"], sd["state"])
    bad = dict(sd, sharding=dict(sd["sharding"], layout="whole_tensor"))
    with pytest.raises(ValueError, match="same world size"):
        again.load_state_dict(bad)


def _forced(rank: int, world: int) -> dict[str, float]:
    """One gloo rank with MEMOPT_SHARD_WORLD1_COLLECTIVES=1: the sharded code path
    (buckets, hooks, reduce-scatter / all-gather, FSDP2) against the plain run."""
    import os

    from tests.sharding import _train3 as T3

    os.environ["MEMOPT_SHARD_WORLD1_COLLECTIVES"] = "1"
    worst = {}
    for name in ("adamw", "galore"):
        ref_losses, ref_model, _ = T.reference(name)
        for stage in (1, 2, 3):
            build = T3.make_model if stage == 3 else T.make_model
            model = build()
            model, sharded = memopt.shard(model, T.make_optimizer(name, model), stage)
            assert not sharded._plain, "the forced path was not taken"
            trainer = T3.train if stage == 3 else T.train
            losses = trainer(model, sharded)
            ref = T3.reference_losses(name) if stage == 3 else ref_losses
            gaps = [abs(a - b) for a, b in zip(losses, ref, strict=True)]
            worst[f"{name}/stage{stage}"] = max(gaps)
    del os.environ["MEMOPT_SHARD_WORLD1_COLLECTIVES"]
    return worst


def test_forced_collectives_on_one_rank_equal_the_plain_path() -> None:
    from tests._harness.dist import run_distributed

    worst = run_distributed(_forced, world_size=1, timeout_s=120)[0]
    assert all(v <= 1e-6 for v in worst.values()), worst


def test_add_param_group_after_sharding_is_an_error() -> None:
    """The groups are planned once; a group added later would never be reduced (ranks drift)."""
    model = T.make_model()
    first, *rest = list(model.parameters())
    model, sharded = memopt.shard(model, torch.optim.AdamW([first]), 2, "whole_tensor")
    with pytest.raises(NotImplementedError, match="before memopt.shard"):
        sharded.add_param_group({"params": rest})
    assert len(sharded.param_groups) == 1


def test_stage3_offload_without_a_process_group_explains_the_limit() -> None:
    """Stage 3 without a process group is the plain one-rank path: offload= takes what stages
    1 and 2 take, and the error says how to get FSDP2's per-unit state store instead."""
    model = T.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(NotImplementedError, match="one-rank group is enough"):
        memopt.shard(model, opt, 3, offload="cpu")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loaded_parameters_replace_stale_fp32_masters(stage: int) -> None:
    """A bf16 model with fp32 masters: parameters written from outside between steps
    (model.load_state_dict, a checkpoint restore) used to be overwritten by the next step
    from the old masters; the masters are now rebuilt from them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, sharded = memopt.shard(model, opt, stage, master_dtype=torch.float32)
    for _ in range(2):  # some steps first: masters and parameters in use
        model(torch.randn(4, 8).bfloat16()).float().sum().backward()
        sharded.step()
        sharded.zero_grad()
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    model(torch.randn(4, 8).bfloat16()).float().sum().backward()
    sharded.step()
    assert 0 < float(model.weight.abs().max()) <= 1.1e-3  # one step from zero, not from before


def test_master_dtype_narrower_than_the_parameters_is_refused() -> None:
    model = torch.nn.Linear(8, 8)  # fp32
    with pytest.raises(ValueError, match="narrower than the parameter"):
        memopt.shard(model, torch.optim.AdamW(model.parameters()), 2,
                     master_dtype=torch.bfloat16)  # fmt: skip
