"""A copy of an optimizer driven by step_in_backward (or wrapped by memopt.shard) carries no
mark of it (sweep48 F8): the copy has no hooks and no wrapper, so step_in_backward and
memopt.shard take it; the original stays refused while its handle is installed."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import memopt
from memopt.optim import AdamW, step_in_backward


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _loss(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return model(torch.randn(4, 8, generator=g)).pow(2).mean()


def _pickled(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_an_in_backward_optimizer_is_free(how: str) -> None:
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    handle = step_in_backward(model, opt)
    dup = copy.deepcopy if how == "deepcopy" else _pickled
    # a copy (no hooks) before any step: memopt.shard takes it (old: "runs inside the backward")
    _, sharded = memopt.shard(*dup((model, opt)), 1)  # type: ignore[misc]
    sharded.close()
    _loss(model).backward()  # one step inside the backward
    model2, opt2 = dup((model, opt))  # type: ignore[misc]
    # step_in_backward takes a copy too (old code: "already has optimizer-in-backward hooks")
    handle2 = step_in_backward(model2, opt2)
    before = [p.detach().clone() for p in model2.parameters()]
    _loss(model2).backward()
    assert handle2.steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model2.parameters(), strict=True))
    # the original is still driven by its handle: refused until remove()
    with pytest.raises(ValueError, match="already has optimizer-in-backward hooks"):
        step_in_backward(model, opt)
    with pytest.raises(ValueError, match="runs inside the backward"):
        memopt.shard(model, opt, 1)
    handle2.remove()
    handle.remove()
    step_in_backward(model, opt).remove()  # free again once its handle is removed


def test_a_copy_of_an_optimizer_wrapped_by_shard_is_free() -> None:
    """The optimizer passed to memopt.shard is marked as driven by the ShardedOptimizer
    (step_in_backward refuses it); a deep copy of it and its model is not."""
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    model, sharded = memopt.shard(model, opt, 1)  # (one process, whole tensors: the params)
    with pytest.raises(ValueError, match="now driven by a ShardedOptimizer"):
        step_in_backward(model, opt)
    model2, opt2 = copy.deepcopy((model, opt))
    step_in_backward(model2, opt2).remove()  # old code: "now driven by a ShardedOptimizer"
    sharded.close()
