"""An optimizer state that does not fit the parameters is refused, with nothing changed.

torch's ``Optimizer.load_state_dict`` checks only the number of parameters per group, so a
state dict saved for a model of other shapes loads silently; the next step then hands
moments of the wrong size to the fused kernels (torch's CPU ``_fused_adamw_`` corrupts the
heap: "double free or corruption"). memopt checks every moment and stored basis against
the parameter it is loaded for, before anything is replaced, and checks the moments again
before a step reads them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from tests.optim.test_param_dtypes import BUILDERS

CASES = [*BUILDERS, "adamw int8"]


def _build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adamw int8":
        return BUILDERS["adamw"](model, lr=1e-3, state_dtype="int8")
    return BUILDERS[name](model, lr=1e-3)


def _model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 80))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        model(torch.randn(8, 64, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _snapshot(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


@pytest.mark.parametrize("name", CASES)
def test_state_of_other_shapes_is_refused(name: str) -> None:
    warnings.simplefilter("ignore")
    small = _model(48)
    opt = _build(name, small)
    _steps(small, opt, 4)  # past a refresh (gap 3)
    saved = opt.state_dict()

    # the same shapes load (and keep stepping)
    same = _model(48)
    opt_same = _build(name, same)
    opt_same.load_state_dict(copy.deepcopy(saved))
    _steps(same, opt_same, 1)

    # other shapes: refused, and the target optimizer's own state is untouched
    big = _model(72)
    opt_big = _build(name, big)
    _steps(big, opt_big, 2)
    before = _snapshot(opt_big)
    weights = [p.detach().clone() for p in big.parameters()]
    with pytest.raises(ValueError, match="does not fit") as err:
        opt_big.load_state_dict(copy.deepcopy(saved))
    assert "nothing was loaded" in str(err.value)
    assert _same(_snapshot(opt_big), before)
    _steps(big, opt_big, 1)  # still usable
    assert any(not torch.equal(a, b) for a, b in zip(weights, big.parameters(), strict=True))


def test_error_names_the_parameter() -> None:
    warnings.simplefilter("ignore")
    import memopt

    a = _model(48)
    opt = memopt.optim.AdamW(a.named_parameters(), lr=1e-3)
    _steps(a, opt, 1)
    b = _model(72)
    opt_b = memopt.optim.AdamW(b.named_parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"0\.weight \(shape \(72, 64\) here\).*\(48, 64\)"):
        opt_b.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", ["adamw", "adamw int8", "galore svd", "apollo"])
def test_moments_edited_to_another_shape_fail_before_the_step(name: str) -> None:
    warnings.simplefilter("ignore")
    model = _model(48)
    opt = _build(name, model)
    _steps(model, opt, 1)
    p = next(iter(model.parameters()))  # the first weight, 48 x 64
    st = opt.state[p]
    if "exp_avg" in st:
        st["exp_avg"] = torch.zeros(3, 3)
    else:
        st["moment_shape"] = [3, 3]
    weights = [q.detach().clone() for q in model.parameters()]
    model(torch.randn(8, 64)).square().mean().backward()
    with pytest.raises(ValueError, match="does not fit its parameter"):
        opt.step()
    assert torch.equal(p.detach(), weights[0])


def _torch_adamw_state(**flags: object) -> tuple[torch.nn.Parameter, dict]:
    p = torch.nn.Parameter(torch.randn(6, 4))
    ref = torch.optim.AdamW([p], lr=0.1, **flags)  # type: ignore[arg-type]
    p.grad = torch.randn(6, 4)
    ref.step()
    return p, ref.state_dict()


def test_torch_adamw_checkpoint_loads_and_keeps_memopt_options() -> None:
    from memopt.optim import AdamW

    p, sd = _torch_adamw_state()
    opt = AdamW([p], lr=0.1, state_dtype="int8")
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["state_dtype"] == "int8"  # torch's group lacks it: kept


@pytest.mark.parametrize("flag", ["maximize", "amsgrad"])
def test_torch_checkpoint_asking_for_an_unimplemented_feature_is_refused(flag: str) -> None:
    # loaded silently before, and memopt kept minimizing / ignored max_exp_avg_sq
    from memopt.optim import AdamW

    p, sd = _torch_adamw_state(**{flag: True})
    opt = AdamW([p], lr=0.1)
    with pytest.raises(ValueError, match=f"{flag}=True asks for a feature.*nothing was loaded"):
        opt.load_state_dict(sd)
    assert not opt.state and opt.param_groups[0].get(flag) is None


def test_loaded_group_values_are_checked_like_new_ones() -> None:
    from memopt.optim import AdamW

    p = torch.nn.Parameter(torch.randn(3))
    sd = AdamW([p], lr=0.1).state_dict()
    sd["param_groups"][0]["eps"] = float("nan")
    with pytest.raises(ValueError, match=r"load_state_dict \(group 0\): eps must be a finite"):
        AdamW([p], lr=0.1).load_state_dict(sd)


def test_one_ranks_shard_is_refused_by_a_plain_optimizer() -> None:
    # it loaded silently: state for that rank's parameters only, the rest restarted at zero
    from memopt.optim import AdamW

    p = torch.nn.Parameter(torch.randn(3))
    sd = AdamW([p]).state_dict()
    sd["sharding"] = {"world_size": 2, "rank": 0, "layout": "whole_tensor", "stage": 2}
    with pytest.raises(ValueError, match="one rank's shard.*AsyncCheckpointer.load"):
        AdamW([p]).load_state_dict(sd)
    sd["sharding"] = {"world_size": 1, "rank": 0, "layout": "whole_tensor", "stage": 2}
    AdamW([p]).load_state_dict(sd)  # world size 1: the whole state


def test_tensor_lr_set_on_a_group_still_loads() -> None:
    # a tensor lr assigned after construction is saved as such; the loaded-group checks take it
    from memopt.optim import GaLoreAdamW

    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([{"params": [p], "rank": 2}], lr=1e-3)
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    p.grad = torch.randn(8, 8)
    opt.step()
    again = GaLoreAdamW([{"params": [p], "rank": 2}], lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert float(again.param_groups[0]["lr"]) == pytest.approx(1e-3)
