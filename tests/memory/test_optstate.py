"""The per-optimizer byte rules equal the real optimizers' measured state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memopt.optim as mo
from memopt.memory import optimizer_state, optstate, param_infos


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randint(0, 256, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def _named(model: torch.nn.Module) -> list[dict[str, Any]]:
    names, params = zip(*model.named_parameters(), strict=True)
    return [{"params": list(params), "param_names": list(names)}]


CASES = [
    ("adamw", {}, lambda m: mo.AdamW(_named(m))),
    ("adamw", {"state_dtype": "int8"}, lambda m: mo.AdamW(_named(m), state_dtype="int8")),
    ("adamw", {"state_dtype": "int4"}, lambda m: mo.AdamW(_named(m), state_dtype="int4")),
    ("galore", {"rank": 8}, lambda m: mo.GaLoreAdamW(mo.param_groups(m, rank=8))),
    (
        "galore",
        {"rank": 8, "state_dtype": "int8"},
        lambda m: mo.GaLoreAdamW(mo.param_groups(m, rank=8), state_dtype="int8"),
    ),
    ("galore", {"rank": 500}, lambda m: mo.GaLoreAdamW(mo.param_groups(m, rank=500))),
    (
        "natural_galore",
        {"rank": 8},
        lambda m: mo.NaturalGaLoreAdamW(mo.param_groups(m, rank=8)),
    ),
    ("apollo", {"rank": 8}, lambda m: mo.ApolloAdamW(mo.param_groups(m, rank=8))),
    ("apollo_mini", {}, lambda m: mo.ApolloMini(mo.param_groups(m, rank=1))),
    ("frugal", {"density": 0.25}, lambda m: mo.FrugalAdamW(mo.param_groups(m, density=0.25))),
    (
        "frugal",
        {"density": 0.5, "proj": "block"},
        lambda m: mo.FrugalAdamW(mo.param_groups(m, density=0.5, proj="block")),
    ),
    # fp32 compute for low-precision weights: moments and the basis (or its cache) in fp32
    ("adamw", {"state_dtype": "float32"}, lambda m: mo.AdamW(_named(m), state_dtype="float32")),
    (
        "galore",
        {"rank": 8, "state_dtype": "float32"},
        lambda m: mo.GaLoreAdamW(mo.param_groups(m, rank=8), state_dtype="float32"),
    ),
    (
        "natural_galore",
        {"rank": 8, "state_dtype": "int8"},
        lambda m: mo.NaturalGaLoreAdamW(mo.param_groups(m, rank=8), state_dtype="int8"),
    ),
    (
        "apollo",
        {"rank": 8, "state_dtype": "float32"},
        lambda m: mo.ApolloAdamW(mo.param_groups(m, rank=8), state_dtype="float32"),
    ),
    (
        "frugal",
        {"density": 0.25, "state_dtype": "float32"},
        lambda m: mo.FrugalAdamW(mo.param_groups(m, density=0.25), state_dtype="float32"),
    ),
]


@pytest.mark.filterwarnings("ignore:rank 500")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("name", "kwargs", "build"), CASES, ids=[f"{c[0]}-{sorted(c[1].items())}" for c in CASES]
)
def test_rule_equals_measured_state(tiny_llama, name, kwargs, build, dtype) -> None:
    """bf16 weights too: bf16 moments and basis by default, fp32 under any state_dtype (the
    basis rule took the weights' dtype there until 2026-11-24) and for Natural GaLore's
    history."""
    tiny_llama.to(dtype)
    opt = build(tiny_llama)
    _one_step(tiny_llama, opt)
    measured = mo.state_bytes(opt)
    target = None if name == "adamw" else "attn|mlp"
    predicted = optimizer_state(param_infos(tiny_llama, target), name, kwargs)
    assert predicted.total == measured.total  # exact: the rules restate the allocations
    assert predicted.cache == measured.cache
    for pname, b in measured.per_param.items():
        assert predicted.per_param[pname] == b, pname


CLASSES = {
    "galore": mo.GaLoreAdamW, "natural_galore": mo.NaturalGaLoreAdamW, "apollo": mo.ApolloAdamW,
    "apollo_mini": mo.ApolloMini, "frugal": mo.FrugalAdamW,
}  # fmt: skip


def _every_projector() -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    """(accepted, refused) (optimizer, kwargs) over every projector and side of each
    low-rank optimizer, by the estimator's own check."""
    accepted, refused = [], []
    for name in CLASSES:
        names = (*optstate.PROJ_NAMES, "block") if name == "frugal" else optstate.PROJ_NAMES
        for proj in names:
            for ptype in ("std", "left", "full"):
                size = {"density": 0.5} if name == "frugal" else {"rank": 8}
                size = {"rank": 1} if name == "apollo_mini" else size  # (it is rank 1)
                kw = {**size, "proj": proj, "proj_type": ptype}
                try:
                    optstate.check_kwargs(name, kw)
                except ValueError:
                    refused.append((name, kw))
                    continue
                accepted.append((name, kw))
    return accepted, refused


ACCEPTED, REFUSED = _every_projector()
EXTRA = [  # ranks past a side (an SVD gives min(m, n) vectors), 8-/4-bit flat moments
    ("galore", {"rank": 100, "proj": "svd", "proj_type": "reverse_std"}),
    ("apollo", {"rank": 100, "proj": "subspace", "proj_type": "left"}),
    ("galore", {"rank": 100, "proj": "columns", "proj_type": "reverse_std"}),
    ("frugal", {"density": 0.5, "proj": "coordinate", "state_dtype": "int8"}),
    ("galore", {"density": 0.5, "proj": "coordinate", "state_dtype": "int4"}),
    ("natural_galore", {"rank": 8, "proj": "columns", "state_dtype": "float32"}),
]


def _build(model: torch.nn.Module, name: str, kw: dict[str, Any]) -> torch.optim.Optimizer:
    kw = dict(kw)
    sd = {"state_dtype": kw.pop("state_dtype")} if "state_dtype" in kw else {}
    return CLASSES[name](mo.param_groups(model, **kw), **sd)


@pytest.mark.filterwarnings("ignore:rank 100")
@pytest.mark.parametrize(("name", "kwargs"), ACCEPTED + EXTRA, ids=str)
def test_every_projector_rule_equals_measured_state(tiny_llama, name, kwargs) -> None:
    """Index projectors keep int64 indices as cache (columns: kept rows and columns;
    coordinate: k flat moments and k indices), subspace and APOLLO's SVD bases are saved
    state: to the byte, the saved / cache split included (columns read 1.15, coordinate
    1.08 for GaLore and 0.69 for FRUGAL before)."""
    opt = _build(tiny_llama, name, kwargs)
    _one_step(tiny_llama, opt)
    measured = mo.state_bytes(opt)
    predicted = optimizer_state(param_infos(tiny_llama), name, kwargs)
    assert (predicted.total, predicted.cache) == (measured.total, measured.cache)
    assert predicted.per_param == {**predicted.per_param, **measured.per_param}


@pytest.mark.parametrize(("name", "kwargs"), REFUSED, ids=str)
def test_refused_combinations_are_not_priced(tiny_llama, name, kwargs) -> None:
    """What the estimator refuses, the optimizer refuses too (FRUGAL proj='random', APOLLO
    with index projectors or proj_type='full', 'gram' with 'full')."""
    with pytest.raises(ValueError, match=f"optimizer_kwargs of '{name}'"):
        optimizer_state([], name, kwargs)
    with pytest.raises((ValueError, NotImplementedError)):
        _one_step(tiny_llama, _build(tiny_llama, name, kwargs))


def test_frugal_rank_for_block_or_coordinate_is_refused() -> None:
    for proj in ("block", "coordinate"):
        with pytest.raises(ValueError, match=f"proj='{proj}' needs density"):
            optimizer_state([], "frugal", {"rank": 4, "proj": proj})


def test_unknown_optimizer_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        optimizer_state([], "lion")
