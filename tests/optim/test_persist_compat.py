"""torch.optim compatibility of memopt's state dicts and load hooks (sweep48 F1, F2, F6, F7).

- A loaded ``step`` becomes memopt's int, whatever torch saved (a float 0-d tensor): FRUGAL's
  block schedule indexed a list with torch's tensor and every step died with a bare
  TypeError after the load had been accepted.
- torch's load post-hooks run at the very end of memopt's load, so what they change sticks
  (memopt rewrote the state after them).
- torch.optim.AdamW's own options are accepted (and ignored) at construction and in groups
  as they are on load; ones asking for features memopt lacks are refused by name.
- A FRUGAL ``state_free`` parameter keeps no moments from a torch checkpoint.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memopt.optim as mo


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4)
    )


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    ps = list(model.parameters())
    return [p for p in ps if p.dim() == 2], [p for p in ps if p.dim() < 2]


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def _torch_sd(model: nn.Module, n: int = 3, **kw: object) -> dict:
    weights, biases = _split(model)
    ref = torch.optim.AdamW([{"params": weights}, {"params": biases}], lr=1e-2, **kw)  # type: ignore[arg-type]
    _steps(model, ref, n)
    return copy.deepcopy(ref.state_dict())


# -- F1: torch's float-tensor step ---------------------------------------------------------
@pytest.mark.parametrize("order", ["descending", "random", "mirror"])
def test_torch_state_into_frugal_block_mode_steps(order: str) -> None:
    model = _model()
    sd = _torch_sd(model)
    weights, biases = _split(model)
    opt = mo.FrugalAdamW(
        [{"params": weights, "density": 0.34, "proj": "block", "update_proj_gap": 2,
          "block_order": order}, {"params": biases}], lr=1e-2,
    )  # fmt: skip
    opt.load_state_dict(sd)
    for p in model.parameters():
        assert type(opt.state[p]["step"]) is int and opt.state[p]["step"] == 3
    # the group's tensors: only those active in the coming window keep torch's moments
    active = opt.active_blocks(opt.param_groups[0], 3 // 2)
    for p in weights:
        assert ("exp_avg" in opt.state[p]) == (id(p) in active)
    _steps(model, opt, 5, seed=2)  # (before: TypeError from _block_indices on every step)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[weights[0]]["step"] == 8


def test_torch_moments_continue_in_an_active_block() -> None:
    """density 1 keeps every tensor active: the loaded run continues torch's AdamW."""
    model = _model()
    sd = _torch_sd(model, fused=True, weight_decay=0.0)
    ref_model = copy.deepcopy(model)
    w_ref, b_ref = _split(ref_model)
    ref = torch.optim.AdamW([{"params": w_ref}, {"params": b_ref}], lr=1e-2, fused=True,
                            weight_decay=0.0)  # fmt: skip
    ref.load_state_dict(copy.deepcopy(sd))  # (a load aliases the dict's tensors)
    weights, biases = _split(model)
    opt = mo.FrugalAdamW(
        [{"params": weights, "density": 1.0, "proj": "block", "update_proj_gap": 100},
         {"params": biases}], lr=1e-2,
    )  # fmt: skip
    opt.load_state_dict(sd)
    _steps(model, opt, 3, seed=2)
    _steps(ref_model, ref, 3, seed=2)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)  # (both run torch's fused AdamW kernel)


def _every_optimizer(model: nn.Module) -> list[torch.optim.Optimizer]:
    """Each memopt optimizer with the model in plain groups (a torch checkpoint holds no
    state for low-rank parameters) beside an empty-state low-rank group where there is one."""
    ps = list(model.parameters())
    return [
        mo.AdamW(ps, lr=1e-2),
        mo.AdamW(ps, lr=1e-2, state_dtype="int8"),
        mo.GaLoreAdamW([{"params": ps}], lr=1e-2),
        mo.ApolloAdamW([{"params": ps}], lr=1e-2),
        mo.ApolloMini([{"params": ps}], lr=1e-2),
        mo.FrugalAdamW([{"params": ps}], lr=1e-2),
        mo.NaturalGaLoreAdamW([{"params": ps}], lr=1e-2),
    ]


@pytest.mark.parametrize("index", range(7))
def test_loaded_step_is_an_int_everywhere(index: int) -> None:
    model = _model()
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _steps(model, ref, 2)
    sd = copy.deepcopy(ref.state_dict())
    assert isinstance(sd["state"][0]["step"], torch.Tensor)  # (torch's form)
    opt = _every_optimizer(model)[index]
    opt.load_state_dict(sd)
    assert all(type(opt.state[p]["step"]) is int for p in model.parameters())
    _steps(model, opt, 2, seed=3)
    assert all(opt.state[p]["step"] == 4 for p in model.parameters())
    # the re-saved state is memopt's own (it has memopt's index)
    assert all("index" in st for st in opt.state_dict()["state"].values())


@pytest.mark.parametrize("bad", [torch.tensor(1.5), -1, "3", torch.tensor([1.0, 2.0])])
def test_a_step_that_is_no_count_is_refused(bad: object) -> None:
    model = _model()
    sd = _torch_sd(model)
    sd["state"][0]["step"] = bad
    weights, biases = _split(model)
    opt = mo.AdamW([{"params": weights}, {"params": biases}], lr=1e-2)
    _steps(model, opt, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"step=.*not a step count.*nothing was loaded"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for k, st in before["state"].items():
        assert after["state"][k]["step"] == st["step"]
        assert torch.equal(after["state"][k]["exp_avg"], st["exp_avg"])


# -- F2: load post-hooks run last ----------------------------------------------------------
@pytest.mark.parametrize("cls", [mo.AdamW, mo.GaLoreAdamW])
def test_load_post_hook_edits_stick(cls: type) -> None:
    model = _model()
    opt = cls(model.parameters(), lr=1e-2)
    _steps(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    other = cls(model.parameters(), lr=1e-2)
    seen: list[object] = []

    def zero_moments(o: torch.optim.Optimizer) -> None:
        seen.append(type(o.state[next(iter(model.parameters()))]["step"]))
        for st in o.state.values():
            st["exp_avg"] = torch.zeros_like(st["exp_avg"])
        o.param_groups[0]["lr"] = 0.5

    other.register_load_state_dict_post_hook(zero_moments)
    other.load_state_dict(sd)
    assert seen == [int]  # the hook sees the state as memopt leaves it
    assert other.param_groups[0]["lr"] == 0.5
    assert all(not st["exp_avg"].any() for st in other.state.values())


def test_load_post_hook_can_clear_the_state() -> None:
    model = _model()
    opt = mo.AdamW(model.parameters(), lr=1e-2)
    _steps(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    other = mo.AdamW(model.parameters(), lr=1e-2)
    other.register_load_state_dict_post_hook(lambda o: o.state.clear())
    other.load_state_dict(sd)
    assert len(other.state) == 0  # as torch.optim.AdamW (before: 6, rewritten after it)
    assert len(other._optimizer_load_state_dict_post_hooks) == 1  # still registered


# -- F6: torch.optim.AdamW's options ---------------------------------------------------------
def test_adamw_takes_torch_adamw_arguments() -> None:
    model = _model()
    twin = copy.deepcopy(model)
    opt = mo.AdamW(model.parameters(), 1e-2, (0.9, 0.999), 1e-8, 1e-2, False,
                   fused=True, foreach=False, maximize=False, capturable=False,
                   differentiable=False)  # fmt: skip
    plain = mo.AdamW(twin.parameters(), lr=1e-2)
    _steps(model, opt, 3)
    _steps(twin, plain, 3)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # ignored: the same fused kernel either way


@pytest.mark.parametrize("key", ["amsgrad", "maximize", "capturable", "differentiable"])
def test_torch_features_memopt_lacks_are_named(key: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match=rf"{key}=True asks for a feature of torch.optim.AdamW"):
        mo.AdamW(model.parameters(), lr=1e-2, **{key: True})
    with pytest.raises(ValueError, match=rf"{key}=True asks for a feature"):
        mo.GaLoreAdamW([{"params": list(model.parameters()), key: True}], lr=1e-2)


@pytest.mark.parametrize("cls", [mo.AdamW, mo.GaLoreAdamW, mo.ApolloAdamW, mo.FrugalAdamW])
def test_torch_group_keys_at_construction_as_on_load(cls: type) -> None:
    model = _model()
    torch_keys = {"foreach": None, "fused": True, "amsgrad": False, "maximize": False,
                  "capturable": False, "differentiable": False,
                  "decoupled_weight_decay": True}  # fmt: skip
    opt = cls([{"params": list(model.parameters()), **torch_keys}], lr=1e-2)
    _steps(model, opt, 1)
    with pytest.raises(ValueError, match="decoupled_weight_decay=False with weight_decay"):
        cls([{"params": list(model.parameters()), "decoupled_weight_decay": False,
              "weight_decay": 0.1}], lr=1e-2)  # fmt: skip


def test_add_param_group_after_loading_a_torch_checkpoint() -> None:
    model = _model()
    ps = list(model.parameters())
    ref = torch.optim.AdamW(ps[:4], lr=1e-2)
    opt = mo.AdamW(ps[:4], lr=1e-2)
    opt.load_state_dict(ref.state_dict())
    options = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert "fused" in options  # torch's keys came with the load
    opt.add_param_group({**options, "params": ps[4:]})  # (before: ValueError, unknown keys)
    _steps(model, opt, 2)
    assert all(opt.state[p]["step"] == 2 for p in ps)
    with pytest.raises(ValueError, match="maximize=True"):
        opt.add_param_group({**options, "maximize": True, "params": [nn.Parameter(torch.ones(2))]})
    assert len(opt.param_groups) == 2


# -- F7: state-free parameters keep no moments -------------------------------------------------
def test_state_free_parameters_drop_loaded_moments() -> None:
    model = _model()
    sd = _torch_sd(model, n=2)
    twin = copy.deepcopy(model)

    def build(m: nn.Module) -> mo.FrugalAdamW:
        weights, biases = _split(m)
        return mo.FrugalAdamW([{"params": weights, "state_free": True}, {"params": biases}],
                              lr=1e-2)  # fmt: skip

    opt, fresh = build(model), build(twin)
    opt.load_state_dict(sd)
    weights, _ = _split(model)
    for p in weights:
        assert set(opt.state[p]) == {"step", "index"}  # (before: torch's moments, forever)
    _steps(model, opt, 2, seed=2)
    _steps(twin, fresh, 2, seed=2)
    assert mo.state_bytes(opt).total == mo.state_bytes(fresh).total
    assert all(opt.state[p]["step"] == 4 for p in weights)
