"""The torch.optim surface of the optimizer memopt.shard returns (sweep48 F3, F5, F9).

- F3: state-dict and load hooks registered on the sharded optimizer run, in torch's order (a
  state_dict post-hook's replacement is what is returned, a load pre-hook's is what loads);
  the same for a standalone OffloadedAdamW, whose post-hook sees the tier's tensors; step
  hooks on the optimizer passed into memopt.shard fire with offload= too.
- F5: ``sharded.state[p]`` with a model parameter gives this rank's state for it (a row
  shard's, an fp32 master's), never inserts a key, and state_dict keeps working.
- F9: an optimizer whose step requires a closure (LBFGS) is refused by memopt.shard.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.offload import OffloadedAdamW
from tests._harness.dist import run_distributed


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(model: nn.Module, opt: Any, steps: int = 2, rank: int = 0, world: int = 1) -> None:
    g = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        x, y = x.chunk(world)[rank].to(dtype), y.chunk(world)[rank].to(dtype)
        opt.zero_grad()
        (model(x) - y).float().pow(2).mean().backward()
        opt.step()


def _hook_all(opt: Any, calls: list[Any]) -> None:
    """Every state-dict hook kind, each noting itself; the post-hook returns a new dict and
    the load pre-hook returns one with another lr (what must load)."""
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("sd_post")
        return {**sd, "user_extra": 1}

    def ld_pre(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("ld_pre")
        return {**sd, "param_groups": [dict(g, lr=0.125) for g in sd["param_groups"]]}

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(ld_pre)
    opt.register_load_state_dict_post_hook(
        lambda o: calls.append(("ld_post", o.param_groups[0]["lr"]))
    )


CASES = [(1, "whole_tensor", None), (2, "whole_tensor", None), (2, "dim0", None),
         (2, "whole_tensor", "cpu"), (3, "dim0", None)]  # fmt: skip


@pytest.mark.parametrize(("stage", "layout", "offload"), CASES)
def test_state_dict_hooks_run_on_the_sharded_optimizer(
    stage: int, layout: str, offload: str | None
) -> None:
    model = _model()
    opt = memopt.optim.AdamW(model.parameters(), lr=1e-2)
    model, sharded = memopt.shard(model, opt, stage, layout, offload=offload)
    calls: list[Any] = []
    _hook_all(sharded, calls)
    _train(model, sharded)
    sd = sharded.state_dict()
    assert calls == ["sd_pre", "sd_post"]
    assert sd["user_extra"] == 1 and "sharding" in sd  # (old code: hooks never ran)
    saved_groups = copy.deepcopy(sd["param_groups"])
    sharded.load_state_dict(sd)
    assert calls[2:] == ["ld_pre", ("ld_post", 0.125)]  # post-hook: after the whole load
    assert sharded.param_groups[0]["lr"] == 0.125  # the pre-hook's dict is what loaded
    assert sd["param_groups"] == saved_groups  # the caller's dict is left alone
    sharded.close()


def test_offloaded_adamw_runs_its_hooks_around_the_whole_state_dict() -> None:
    model = _model()
    opt = OffloadedAdamW(model.parameters(), lr=1e-2)
    try:
        seen: list[Any] = []
        opt.register_state_dict_post_hook(
            lambda o, sd: seen.append(sorted(next(iter(sd["state"].values()))))
        )
        calls: list[Any] = []
        _hook_all(opt, calls)
        _train(model, opt)
        sd = opt.state_dict()
        # post-hooks see the finished entries (old code: torch's, before the tier's tensors)
        assert seen == [["exp_avg", "exp_avg_sq", "master", "step"]]
        assert sd["user_extra"] == 1
        opt.load_state_dict(sd)
        assert calls == ["sd_pre", "sd_post", "ld_pre", ("ld_post", 0.125)]  # old: no ld_*
        assert opt.param_groups[0]["lr"] == 0.125
    finally:
        opt.close()


def test_offloaded_adamw_state_read_before_a_step_keeps_state_dict_working() -> None:
    model = _model()
    opt = OffloadedAdamW(model.parameters(), lr=1e-2)
    try:
        assert len(opt.state[next(model.parameters())]) == 0  # (torch: inserts an empty dict)
        assert opt.state_dict()["state"] == {}  # old code: the tier had nothing to read
        _train(model, opt, steps=1)
        assert len(opt.state_dict()["state"]) == 4
    finally:
        opt.close()


@pytest.mark.parametrize("kind", ["torch", "galore"])
@pytest.mark.parametrize("stage", [1, 2])
def test_step_hooks_on_the_optimizer_given_to_shard_fire_with_offload(
    kind: str, stage: int
) -> None:
    """offload= steps an OffloadedAdamW (or the GaLore optimizer's step_one) in place of the
    optimizer passed in: its step hooks used to stay silent (an AsyncCheckpointer that saved
    it before sharding lost its fence)."""
    model = _model()
    if kind == "torch":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        mats = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = memopt.optim.GaLoreAdamW([{"params": mats, "rank": 2}, {"params": rest}], lr=1e-2)
    weight = model[0].weight
    events: list[Any] = []
    opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", o, weight.sum().item())))
    opt.register_step_post_hook(lambda o, a, k: events.append(("post", o, weight.sum().item())))
    model, sharded = memopt.shard(model, opt, stage, offload="cpu")
    before = weight.sum().item()
    _train(model, sharded, steps=1)
    assert [e[0] for e in events] == ["pre", "post"]  # old code: []
    assert all(e[1] is opt for e in events)
    assert events[0][2] == before != events[1][2]  # pre before the update, post after it
    sharded.close()


@pytest.mark.parametrize(
    ("stage", "layout", "bf16"), [(2, "dim0", False), (3, "dim0", False), (1, "whole_tensor", True)]
)
def test_state_indexed_by_model_parameters(stage: int, layout: str, bf16: bool) -> None:
    """World size 1: row views (dim0, the one-rank stage 3) and fp32 masters are the inner
    optimizer's keys, not the model's parameters."""
    model = _model().to(torch.bfloat16 if bf16 else torch.float32)
    opt = memopt.optim.AdamW(model.parameters(), lr=1e-2)
    master = torch.float32 if bf16 else None
    model, sharded = memopt.shard(model, opt, stage, layout, master_dtype=master)
    _train(model, sharded)
    entries = len(sharded.state)
    for p in model.parameters():
        assert p in sharded.state
        st = sharded.state[p]  # old code: an empty dict, inserted under the parameter
        assert st["exp_avg"].shape == p.shape and st["exp_avg"].dtype == torch.float32
        assert sharded.state.get(p) is st
    assert len(sharded.state) == entries
    assert len(sharded.state_dict()["state"]) == entries  # old code: KeyError: <id>
    _train(model, sharded, steps=1)


def test_state_refuses_keys_that_are_no_parameter_and_state_dict_drops_stray_entries() -> None:
    model = _model()
    model, sharded = memopt.shard(model, memopt.optim.AdamW(model.parameters()), 2, "dim0")
    _train(model, sharded)
    stranger = torch.zeros(3)
    with pytest.raises(KeyError, match="not a parameter this optimizer steps"):
        sharded.state[stranger]
    with pytest.raises(KeyError, match="not a parameter this optimizer steps"):
        sharded.state[stranger] = {}
    assert stranger not in sharded.state and sharded.state.get(stranger) is None
    entries = len(sharded.state)
    sharded.inner.state[stranger]  # an empty entry made behind the view (a defaultdict read)
    assert len(sharded.state_dict()["state"]) == entries  # dropped: it carried nothing
    assert stranger not in sharded.inner.state
    sharded.inner.state[stranger]["exp_avg"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"shapes \[\(3,\)\] that are in no param group"):
        sharded.state_dict()
    assert "exp_avg" in sharded.inner.state[stranger]  # nothing changed by the refusal


def _two_ranks(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage, layout in ((1, "whole_tensor"), (2, "dim0"), (3, "dim0")):
        model = _model()
        opt = memopt.optim.AdamW(model.parameters(), lr=1e-2)
        model, sharded = memopt.shard(model, opt, stage, layout)
        calls: list[Any] = []
        _hook_all(sharded, calls)
        _train(model, sharded, rank=rank, world=world)
        entries = len(sharded.state)
        held, elsewhere, refusals, rows = [], [], [], {}
        for name, p in model.named_parameters():
            st = sharded.state[p]
            if "exp_avg" not in st:  # another rank's: empty here, and read-only
                elsewhere.append(name)
                with pytest.raises(TypeError, match="stepped on rank") as info:
                    st["exp_avg"] = torch.zeros(1)
                refusals.append(str(info.value))
            else:
                held.append(name)
                rows[name] = (tuple(st["exp_avg"].shape), tuple(p.shape))
        sd = sharded.state_dict()
        sharded.load_state_dict(sd)
        _train(model, sharded, steps=1, rank=rank, world=world)
        out[f"{stage}/{layout}"] = {
            "entries": (entries, len(sharded.state), len(sd["state"])),
            "held": held, "elsewhere": elsewhere, "refusals": refusals, "rows": rows,
            "calls": calls, "extra": sd.get("user_extra"),
        }  # fmt: skip
        sharded.close()
    out["unit_hooks"] = _stage3_units_hooks(rank, world)
    return out


def _stage3_units_hooks(rank: int, world: int) -> list[str]:
    """Stage 3 with offload= streams FSDP2 units, stepping the inner optimizer once per unit;
    its step hooks (registered before memopt.shard) fire once per step all the same."""
    from memopt.sharding import FSDPOptions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    units = FSDPOptions(modules=[model[0], model[2], model[4]])
    model, sharded = memopt.shard(model, opt, 3, offload="cpu", fsdp=units)
    assert len(sharded._units) == 3
    _train(model, sharded, rank=rank, world=world)
    sharded.close()
    return calls


def test_two_ranks_state_view_and_hooks() -> None:
    r0, r1 = run_distributed(_two_ranks, 2, timeout_s=240)
    for out in (r0, r1):  # once per step, not once per unit (old code: 3 pairs per step)
        assert out.pop("unit_hooks") == ["pre", "post"] * 2
    names = [n for n, _ in _model().named_parameters()]
    for key in r0:
        for r, out in enumerate((r0, r1)):
            a, b, c = out[key]["entries"]
            assert a == b == c, (key, r, out[key])  # no key inserted; state_dict saves all
            assert out[key]["calls"] == ["sd_pre", "sd_post", "ld_pre", ("ld_post", 0.125)]
            assert out[key]["extra"] == 1
        if key.endswith("dim0"):  # every rank holds rows of every parameter
            for out in (r0, r1):
                assert out[key]["held"] == names and not out[key]["elsewhere"]
                w = out[key]["rows"]["0.weight"]
                assert w[0][0] == w[1][0] // 2, w  # this rank's half of the rows
        else:  # whole_tensor: each parameter is held by exactly one rank
            assert sorted(r0[key]["held"] + r1[key]["held"]) == sorted(names)
            assert sorted(r0[key]["elsewhere"]) == sorted(r1[key]["held"])
            for r, out in enumerate((r0, r1)):
                for msg in out[key]["refusals"]:
                    assert f"stepped on rank {1 - r}" in msg and "nothing was written" in msg


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lbfgs_is_refused_before_anything_changes(stage: int) -> None:
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match=r"LBFGS\.step requires \['closure'\]"):
        memopt.shard(model, opt, stage)  # old code: accepted; every step a TypeError
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params, strict=True))
    assert not any(p._post_accumulate_grad_hooks for p in params)


def test_closure_requirement_is_read_from_the_class() -> None:
    class NeedsClosure(torch.optim.SGD):
        def step(self, closure: Any) -> Any:  # type: ignore[override]
            return super().step(closure)

    model = _model()
    with pytest.raises(NotImplementedError, match=r"NeedsClosure\.step requires"):
        memopt.shard(model, NeedsClosure(model.parameters(), lr=0.1), 1)
    # an LR scheduler wraps the instance's step as step(*args, **kwargs): still accepted
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, sharded = memopt.shard(model, opt, 1)
    _train(model, sharded, steps=1)
