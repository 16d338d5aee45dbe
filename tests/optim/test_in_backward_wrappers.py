"""``step_in_backward`` given one of memopt's optimizer wrappers (what ``memopt.shard`` returns,
a ``StateOffloadedOptimizer``) or an ``OffloadedAdamW``: a ValueError that says why (in-backward
does not combine with sharding or offload), never the hint that a torch optimizer was passed.
Before the fix each of these was a TypeError "needs a memopt optimizer ... memopt.optim.AdamW
replaces torch.optim.AdamW", though the user had passed a memopt optimizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memopt
from memopt.offload import OffloadConfig, OffloadedAdamW
from memopt.offload.pinned_tier import PinnedCPUTier
from memopt.offload.state_offload import StateOffloadedOptimizer
from memopt.optim import AdamW, GaLoreAdamW, param_groups, step_in_backward
from tests._harness.dist import run_distributed
from tests.sharding import _train as T
from tests.sharding import _train3 as T3

_NO_COMBINE = "does not combine with memopt.shard or optimizer-state offload"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _opt(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "adamw":
        return AdamW(model.parameters(), lr=1e-2)
    return GaLoreAdamW(param_groups(model, target=".*", rank=4), lr=1e-2)


def _refused(model: torch.nn.Module, opt: Any, pattern: str) -> str:
    with pytest.raises(ValueError, match=pattern) as info:
        step_in_backward(model, opt)
    message = str(info.value)
    assert "replaces torch.optim.AdamW" not in message
    assert _NO_COMBINE in message
    # nothing was installed: no hook on any parameter, the optimizer is not marked in-backward
    for p in model.parameters():
        assert not p._post_accumulate_grad_hooks
    for o in (opt, getattr(opt, "inner", None)):
        assert not getattr(o, "_memopt_in_backward", False)
    return message


@pytest.mark.parametrize("kind", ["adamw", "galore"])
@pytest.mark.parametrize("offload", [None, "cpu", "nvme"])
def test_the_optimizer_memopt_shard_returns_is_refused_clearly(
    kind: str, offload: str | None, tmp_path: Any
) -> None:
    model = _model()
    tier = OffloadConfig(device="nvme", nvme_path=str(tmp_path)) if offload == "nvme" else offload
    model, sharded = memopt.shard(model, _opt(kind, model), stage=2, offload=tier)
    inner = {None: type(sharded.inner).__name__, "cpu": "", "nvme": ""}[offload]
    inner = inner or ("OffloadedAdamW" if kind == "adamw" else "StateOffloadedOptimizer")
    _refused(model, sharded, f"got a ShardedOptimizer \\(inner optimizer: {inner}\\)")
    # the sharded optimizer still trains as usual afterwards
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 16)).square().mean().backward()
    sharded.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    sharded.close()


def test_a_state_offloaded_optimizer_is_refused_clearly() -> None:
    model = _model()
    wrapped = StateOffloadedOptimizer(_opt("galore", model), PinnedCPUTier(), min_bytes=0)
    try:
        _refused(model, wrapped, "got a StateOffloadedOptimizer \\(inner optimizer: GaLoreAdamW")
        # and its inner optimizer gets the "driven by" refusal, with the same reason
        _refused(model, wrapped.inner, "driven by a StateOffloadedOptimizer.*do not combine")
    finally:
        wrapped.close()


def test_offloaded_adamw_is_refused_clearly() -> None:
    model = _model()
    opt = OffloadedAdamW(model.parameters(), lr=1e-2, offload=OffloadConfig(device="cpu"))
    try:
        message = _refused(model, opt, "got an OffloadedAdamW")
        assert "memopt.optim.AdamW is the in-memory one" in message
    finally:
        opt.close()


def test_a_torch_optimizer_still_gets_the_type_hint() -> None:
    model = _model()
    with pytest.raises(TypeError, match="memopt.optim.AdamW replaces torch.optim.AdamW"):
        step_in_backward(model, torch.optim.AdamW(model.parameters()))


def _fsdp(rank: int, world: int) -> str:
    model = T3.make_model()
    # one rank: parameter offload makes memopt.shard run FSDP2 (an FSDPOptimizer) even so
    model, sharded = memopt.shard(
        model, T.make_optimizer("galore", model), stage=3, offload_params="cpu"
    )
    assert isinstance(sharded, memopt.sharding.FSDPOptimizer)
    return _refused(model, sharded, "got a FSDPOptimizer \\(inner optimizer: GaLoreAdamW\\)")


def test_the_stage3_optimizer_is_refused_clearly() -> None:
    run_distributed(_fsdp, world_size=1, timeout_s=60)
