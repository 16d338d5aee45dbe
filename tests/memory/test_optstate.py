"""The per-optimizer byte rules equal the real optimizers' measured state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memopt.optim as mo
from memopt.memory import optimizer_state, param_infos


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


def test_unknown_optimizer_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        optimizer_state([], "lion")
