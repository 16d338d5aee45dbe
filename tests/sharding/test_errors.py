"""Bad input to memopt.shard fails with a clear error before any collective is issued."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt
from memopt.sharding import ShardConfig
from tests._harness.dist import run_distributed
from tests.sharding import _train as T


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = T.make_model()
    return model, T.make_optimizer("adamw", model)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"stage": 0}, ValueError, "stage must be 1, 2 or 3"),
        ({"stage": True}, ValueError, "stage must be 1, 2 or 3"),
        ({"stage": 2.0}, ValueError, "stage must be 1, 2 or 3"),
        ({"stage": 3, "layout": "whole_tensor"}, ValueError, "stage 3 row-shards"),
        ({"layout": "flat"}, ValueError, "unknown layout 'flat'"),
        ({"bucket_bytes": 0}, ValueError, "bucket_bytes"),
        ({"master_dtype": torch.int8}, TypeError, "master_dtype"),
    ],
)
def test_bad_config(kwargs: dict, exc: type, match: str) -> None:
    model, opt = _fresh()
    with pytest.raises(exc, match=match):
        memopt.shard(model, opt, **kwargs)
    with pytest.raises(exc, match=match):
        ShardConfig(**kwargs)


def test_optimizer_with_state() -> None:
    model, opt = _fresh()
    model(torch.randn(2, 7)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="already has state"):
        memopt.shard(model, opt)


def test_mixed_devices_and_foreign_params() -> None:
    model, _ = _fresh()
    model[5].to("meta")
    with pytest.raises(ValueError, match="several devices"):
        memopt.shard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model, _ = _fresh()
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not parameters of the model"):
        memopt.shard(model, torch.optim.SGD([*model.parameters(), stray], lr=0.1))


def test_sparse_embedding_is_named() -> None:
    # it failed at the first reduction with "reshape is not implemented for sparse tensors"
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"\['0'\] produce sparse gradients.*sparse=False"):
        memopt.shard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    root = nn.Embedding(10, 4, sparse=True)  # the root module has the name ''
    with pytest.raises(ValueError, match=r"\['Embedding'\] produce sparse gradients"):
        memopt.shard(root, torch.optim.SGD(root.parameters(), lr=0.1))


def test_wrong_types_and_double_wrap() -> None:
    model, opt = _fresh()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        memopt.shard(model, object())  # type: ignore[arg-type]
    _, sharded = memopt.shard(model, opt)
    with pytest.raises(ValueError, match="already sharded"):
        memopt.shard(model, sharded)


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_copies_are_refused_with_the_way_out(how: str) -> None:
    """A copy lacked the shards and hooks and failed with AttributeError on first use."""
    import copy
    import pickle

    model, opt = _fresh()
    _, sharded = memopt.shard(model, opt)
    do = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": pickle.dumps}[how]
    with pytest.raises(TypeError, match="cannot be copied or pickled.*state_dict"):
        do(sharded)


def test_group_without_init() -> None:
    model, opt = _fresh()
    with pytest.raises(ValueError, match="not initialized"):
        memopt.shard(model, opt, process_group=object())


def _bad_groups(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    seen = []
    only0 = dist.new_group([0])
    model, opt = _fresh()
    if rank == 1:  # not a member of the group: a local error, no collective
        try:
            memopt.shard(model, opt, process_group=only0)
        except ValueError as e:
            seen.append(str(e))
    else:  # a group of one: the plain path
        memopt.shard(model, opt, process_group=only0)
    # one rank's optimizer has state: every rank raises instead of hanging
    model, opt = _fresh()
    if rank == 1:
        model(torch.randn(2, 7)).sum().backward()
        opt.step()
    try:
        memopt.shard(model, opt, stage=2)
    except ValueError as e:
        seen.append(str(e))
    return seen


def test_process_group_errors_on_two_ranks() -> None:
    r0, r1 = run_distributed(_bad_groups, world_size=2, timeout_s=60)
    assert len(r0) == 1 and "rank(s) [1] failed" in r0[0]
    assert "not a member" in r1[0] and "already has state" in r1[1]


def _nonfinite_refresh_on_ranks(rank: int, world: int, layout: str, offload: str | None) -> dict:
    model = T.make_model()
    opt = T.make_optimizer("galore", model)  # refresh at steps 0, 4, ...
    model, opt = memopt.shard(model, opt, stage=2, layout=layout, offload=offload)
    raised = []
    for step in range(5):
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(step))
        hook = None
        if step == 4:  # one weight (owned by one rank) gets a nan gradient at a refresh
            hook = model[5].weight.register_hook(lambda g: g * float("nan"))
        model(x).square().mean().backward()
        try:
            opt.step()
        except FloatingPointError as e:
            raised.append((step, str(e)))
        opt.zero_grad()
        if hook is not None:
            hook.remove()
    return {"raised": raised, "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize(("layout", "offload"),
                         [("whole_tensor", None), ("dim0", None), ("whole_tensor", "cpu")])
def test_nonfinite_refresh_is_refused_by_every_rank(layout: str, offload: str | None) -> None:
    # only the owner raised, and the other rank waited in the gather until the gloo timeout
    out = run_distributed(_nonfinite_refresh_on_ranks, world_size=2, timeout_s=120,
                          args=(layout, offload))  # fmt: skip
    for r in out:
        assert [s for s, _ in r["raised"]] == [4], r["raised"]
        assert "every rank skips this step" in r["raised"][0][1]
    for a, b in zip(out[0]["params"], out[1]["params"], strict=True):
        assert torch.equal(a, b)


def test_deepspeed_config_file_that_is_not_json_is_named(tmp_path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text("{'zero_optimization': }")
    model, opt = _fresh()
    with pytest.raises(ValueError, match=r"deepspeed_config: .*ds.json is not valid JSON"):
        memopt.shard(model, opt, deepspeed_config=bad)
