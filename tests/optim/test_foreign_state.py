"""Another implementation's optimizer state dict is refused at load, with nothing changed.

torch's ``Optimizer.load_state_dict`` takes any per-parameter object. A galore-torch or
apollo-torch state dict (the user's own file, loaded with ``weights_only=False``) has
low-rank moments of memopt's shapes, so it loaded without a word: the ``projector`` objects
went into the state, and the next ``step()`` failed with ``KeyError: 'index'``, leaving the
optimizer broken. The same happened to any low-rank memopt optimizer given moments without
memopt's projector state. A torch.optim.AdamW state dict stays loadable into
``memopt.optim.AdamW``, and into ``state_dtype="int8"``, where its moments were dropped.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import memopt.optim as mo
from memopt.optim.lowbit import dequantize_state
from tests.optim.test_load_shapes import _same, _snapshot, _steps
from tests.optim.test_param_dtypes import BUILDERS

FRESH = "start the memopt optimizer fresh from them; nothing was loaded"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 80))


def _groups(model: nn.Module, **low_rank: object) -> list[dict]:
    weights = [model[0].weight, model[2].weight]
    return [{"params": [model[0].bias, model[2].bias]}, {"params": weights, **low_rank}]


def _refused(opt: torch.optim.Optimizer, model: nn.Module, sd: dict, match: str) -> None:
    """Loading ``sd`` raises ``match``; the optimizer's state is as before and it still steps."""
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(sd)
    assert "nothing was loaded" in str(err.value)
    assert _same(_snapshot(opt), before)
    _steps(model, opt, 1)


def _peer_state(peer: type, **low_rank: object) -> dict:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's FutureWarning
        ref = peer(_groups(model, **low_rank), lr=1e-2)
        _steps(model, ref, 2)
    return copy.deepcopy(ref.state_dict())


def _peers() -> list[tuple[type, type, dict]]:
    galore_torch = pytest.importorskip("galore_torch")  # in the dev extra; CI installs it
    apollo_torch = pytest.importorskip("apollo_torch")
    galore = {"rank": 4, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    apollo = {**galore, "proj": "random", "scale_type": "channel", "scale": 1}
    return [
        (galore_torch.GaLoreAdamW, mo.GaLoreAdamW, galore),
        (apollo_torch.APOLLOAdamW, mo.ApolloAdamW, apollo),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["galore-torch", "apollo-torch"])
def test_peer_state_dict_is_refused_naming_its_source(which: int) -> None:
    peer, mine, low_rank = _peers()[which]
    sd = _peer_state(peer, **low_rank)
    model = _model()
    opt = mine(_groups(model, **low_rank), lr=1e-2)
    _steps(model, opt, 2)  # its own state: kept through the refused load
    _refused(opt, model, sd, f"'projector': .*galore-torch or apollo-torch.*{FRESH}")


@pytest.mark.parametrize("which", [0, 1], ids=["galore-torch", "apollo-torch"])
def test_peer_moments_without_their_projector_are_refused(which: int) -> None:
    peer, mine, low_rank = _peers()[which]
    sd = _peer_state(peer, **low_rank)
    for st in sd["state"].values():  # what a user might try: drop the pickled objects
        for key in ("projector", "seed", "scaled_grad"):
            st.pop(key, None)
    model = _model()
    opt = mine(_groups(model, **low_rank), lr=1e-2)
    _refused(opt, model, sd, f"group 1 param 0 holds Adam moments of shape .*{FRESH}")


LOW_RANK = [n for n in BUILDERS if n not in ("adamw", "frugal block")]


@pytest.mark.parametrize("name", LOW_RANK)
def test_low_rank_moments_without_memopt_keys_are_refused(name: str) -> None:
    # memopt's own moments, shapes right, with only torch's keys left: the step read 'index'
    warnings.simplefilter("ignore")
    model = _model()
    opt = BUILDERS[name](model, lr=1e-3)
    _steps(model, opt, 2)
    sd = opt.state_dict()
    sd["state"] = {
        k: {n: v for n, v in st.items() if n in ("step", "exp_avg", "exp_avg_sq")}
        for k, st in sd["state"].items()
    }
    again = BUILDERS[name](model, lr=1e-3)
    _refused(again, model, sd, f"without memopt's projector state.*{FRESH}")


def test_other_keys_without_memopt_index_are_refused() -> None:
    # bitsandbytes' 8-bit AdamW keeps state1/state2/qmap1...: they loaded and were ignored,
    # and the moments restarted from zero
    p = torch.nn.Parameter(torch.randn(6, 4))
    small = mo.AdamW([p], lr=1e-3, state_dtype="int8")
    sd = {
        "state": {0: {"step": torch.tensor(3.0), "state1": torch.zeros(6, 4, dtype=torch.uint8)}},
        "param_groups": [{**small.defaults, "params": [0]}],
    }
    with pytest.raises(ValueError, match=r"\['state1'\].*bitsandbytes.*nothing was loaded"):
        small.load_state_dict(sd)
    assert not small.state


def _torch_state(shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    ref = torch.optim.AdamW([p], lr=1e-2)
    for i in range(3):
        p.grad = torch.randn(shape) * (i + 1)
        ref.step()
    return p.detach().clone(), copy.deepcopy(ref.state_dict())


def test_torch_adamw_state_still_loads_and_continues_exactly() -> None:
    w, sd = _torch_state((128, 64))
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ref = torch.optim.AdamW([p], lr=1e-2)
    ref.load_state_dict(copy.deepcopy(sd))
    opt = mo.AdamW([q], lr=1e-2)
    opt.load_state_dict(sd)
    for _ in range(2):
        g = torch.randn(128, 64)
        p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_torch_adamw_moments_are_quantized_into_an_int8_group() -> None:
    # they were ignored: the step started the codes from zero beside the unused fp32 moments
    w, sd = _torch_state((128, 64))
    torch_m = sd["state"][0]["exp_avg"].clone()
    torch_v = sd["state"][0]["exp_avg_sq"].clone()
    p = torch.nn.Parameter(w.clone())
    opt = mo.AdamW([p], lr=1e-2, state_dtype="int8")
    opt.load_state_dict(sd)
    st = opt.state[p]
    assert "exp_avg" not in st and "exp_avg_sq" not in st
    m = dequantize_state(
        {"q": st["exp_avg_q"], "absmax": st["exp_avg_absmax"]}, st["moment_shape"], "int8",
        signed=True,
    )  # fmt: skip
    v = dequantize_state(
        {"q": st["exp_avg_sq_q"], "absmax": st["exp_avg_sq_absmax"]}, st["moment_shape"], "int8",
        signed=False,
    )  # fmt: skip
    torch.testing.assert_close(m, torch_m, rtol=0.05, atol=0.01 * float(torch_m.abs().max()))
    torch.testing.assert_close(v, torch_v, rtol=0.05, atol=0.01 * float(torch_v.abs().max()))
    p.grad = torch.randn(128, 64)
    opt.step()
    assert "exp_avg" not in opt.state[p]


def test_torch_moments_load_into_frugal_state_free_and_plain_groups() -> None:
    # no projector state is needed there (a state-free group with a rank steps state-free):
    # a torch AdamW state is not refused
    model = _model()
    groups = [
        {"params": [model[0].weight], "state_free": True, "rank": 4},
        {"params": [model[0].bias, model[2].weight, model[2].bias]},
    ]
    ref = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-3)
    _steps(model, ref, 1)
    opt = mo.FrugalAdamW(groups, lr=1e-3)
    opt.load_state_dict(ref.state_dict())
    _steps(model, opt, 1)
