"""An ``OffloadedAdamW`` state dict loads into memopt's own AdamW.

``OffloadedAdamW`` (memopt.offload; what ``offload=`` at stages 1/2 and DeepSpeed's
``offload_optimizer`` run) saves torch AdamW's layout plus its fp32 ``master`` weights. memopt's
AdamW took that ``master`` for another implementation's key and refused the state dict ("looks
like ... galore-torch ... start the memopt optimizer fresh"), so a run trained with offload could
not resume without it (one process, or ``memopt.shard`` without ``offload=``). The master is now
checked (a float tensor of the parameter's shape) and dropped: no memopt optimizer reads one from
its state. The result is the load of the same state without ``master``, bit for bit. Real
foreign state is still refused.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from memopt.checkpoint import AsyncCheckpointer
from memopt.offload import OffloadConfig, OffloadedAdamW
from memopt.optim import AdamW, GaLoreAdamW

FRESH = "nothing was loaded"


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def _offloaded(model: nn.Module) -> OffloadedAdamW:
    return OffloadedAdamW(
        model.parameters(), lr=1e-2, weight_decay=0.01, offload=OffloadConfig(device="cpu")
    )


def _adamw(model: nn.Module) -> AdamW:
    return AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    dtype = next(model.parameters()).dtype
    for step in range(start, stop):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _trained_offloaded(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, OffloadedAdamW]:
    model = _model(dtype)
    opt = _offloaded(model)
    _train(model, opt, 0, 3)
    return model, opt


def _without_master(sd: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(sd)
    out["state"] = {k: {n: v for n, v in st.items() if n != "master"}
                    for k, st in out["state"].items()}  # fmt: skip
    return out


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _state(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [copy.deepcopy(dict(opt.state[p])) for g in opt.param_groups for p in g["params"]]


def _same_state(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_state_dict_loads_as_without_master(dtype: torch.dtype) -> None:
    """fp32 (the master is the weights' value) and bf16 (the target keeps no master: the
    moments are cast to bf16 as for any fp32 state) both load, as the same dict without
    ``master`` loads, and the caller's dict keeps its master."""
    src, off = _trained_offloaded(dtype)
    sd = off.state_dict()
    assert all("master" in st for st in sd["state"].values())
    runs = []
    for state in (sd, _without_master(sd)):
        model = _model(dtype)
        model.load_state_dict(src.state_dict())
        opt = _adamw(model)
        opt.load_state_dict(state)
        assert all("master" not in opt.state[p] for p in model.parameters())
        _train(model, opt, 3, 6)
        runs.append((_params(model), _state(opt)))
    assert all("master" in st for st in sd["state"].values())  # (not edited in place)
    (p_with, s_with), (p_without, s_without) = runs
    assert all(torch.equal(a, b) for a, b in zip(p_with, p_without, strict=True))
    assert _same_state(s_with, s_without)
    if dtype == torch.float32:  # ...and it continues the offloaded run (torch's update rule)
        _train(src, off, 3, 6)
        for a, b in zip(p_with, src.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=2e-4, atol=2e-5)
    off.close()


def test_snapshot_of_offloaded_adamw_loads_into_adamw_and_back(tmp_path) -> None:
    """Through AsyncCheckpointer: offloaded -> memopt AdamW (was refused) continues the
    offloaded run; memopt AdamW's snapshot -> OffloadedAdamW (the opposite way) still loads
    and continues the same."""
    src, off = _trained_offloaded()
    with AsyncCheckpointer(tmp_path / "off") as ckpt:
        ckpt.save(3, model=src, optimizer=off)
    model = _model()
    opt = _adamw(model)
    with AsyncCheckpointer(tmp_path / "off") as ckpt:
        ckpt.load(model=model, optimizer=opt)
    with AsyncCheckpointer(tmp_path / "plain") as ckpt:
        ckpt.save(3, model=model, optimizer=opt)
    back = _model()
    back_opt = _offloaded(back)
    with AsyncCheckpointer(tmp_path / "plain") as ckpt:
        ckpt.load(model=back, optimizer=back_opt)
    for m, o in ((src, off), (model, opt), (back, back_opt)):
        _train(m, o, 3, 6)
    for a, b, c in zip(src.parameters(), model.parameters(), back.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5)
        assert torch.equal(c, a)  # offloaded again: the same arithmetic as the source
    off.close()
    back_opt.close()


def _refused(opt: torch.optim.Optimizer, sd: dict[str, Any], match: str) -> None:
    before = _state(opt)
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(sd)
    assert FRESH in str(err.value)
    assert _same_state(_state(opt), before)


def test_inconsistent_master_is_refused() -> None:
    _, off = _trained_offloaded()
    sd = off.state_dict()
    off.close()
    model = _model()
    opt = _adamw(model)
    _train(model, opt, 0, 1)
    bad = copy.deepcopy(sd)
    bad["state"][0]["master"] = bad["state"][0]["master"][:3]
    _refused(opt, bad, r"holds 'master'.*shape \(3, 8\) and exp_avg \(32, 8\)")
    bad = copy.deepcopy(sd)
    for key in ("master", "exp_avg", "exp_avg_sq"):  # consistent, but not this parameter's
        bad["state"][0][key] = bad["state"][0][key].t().contiguous()
    _refused(opt, bad, r"holds 'master'.*shape \(8, 32\)")
    bad = copy.deepcopy(sd)
    bad["state"][1]["master"] = bad["state"][1]["master"].long()
    _refused(opt, bad, r"holds 'master'.*torch.int64, not a float tensor")


def test_foreign_state_is_still_refused() -> None:
    """A key memopt does not write beside ``master`` is still another implementation's; and a
    low-rank parameter still needs memopt's projector state."""
    _, off = _trained_offloaded()
    sd = off.state_dict()
    off.close()
    opt = _adamw(_model())
    foreign = copy.deepcopy(sd)
    foreign["state"][0]["projector_seed"] = torch.tensor(3)
    _refused(opt, foreign, r"holds \['projector_seed'\].*another implementation")
    model = _model()
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    galore = GaLoreAdamW([{"params": mats, "rank": 2}, {"params": rest}], lr=1e-2)
    order = {id(p): i for i, p in enumerate(model.parameters())}
    mapped = copy.deepcopy(sd)  # the offloaded state in GaLore's parameter order
    ids = [order[id(p)] for g in galore.param_groups for p in g["params"]]
    mapped["state"] = {i: sd["state"][j] for i, j in enumerate(ids)}
    mapped["param_groups"] = [{**sd["param_groups"][0], "params": [0, 1]},
                              {**sd["param_groups"][0], "params": [2, 3]}]  # fmt: skip
    _refused(galore, mapped, "without memopt's projector state")
