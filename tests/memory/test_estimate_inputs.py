"""``estimate`` input validation: every bad field is a ValueError naming it and the allowed
values (never silently ignored), and the value lists equal the optimizers' own."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memopt.optim as mo
from memopt.memory import estimate, optstate
from memopt.memory.estimate import EstimateConfig
from memopt.optim import _groups, projection
from tests.memory.conftest import tiny_config

CFG = tiny_config()
KW = {"batch_size": 1, "seq_len": 8}


@pytest.mark.parametrize(
    ("optimizer", "kwargs", "match"),
    [
        ("adamw", {"state_dtype": "int3"}, r"state_dtype must be None .*'int4', got 'int3'"),
        ("galore", {"rnak": 8}, r"unknown option\(s\) \['rnak'\]; supported: .*'rank'"),
        ("adamw", {"rank": 8}, r"unknown option\(s\) \['rank'\].*adamw keeps full state"),
        ("galore", {"rank": 0}, "rank must be a positive integer, got 0"),
        ("galore", {"rank": True}, "rank must be a positive integer, got True"),
        ("frugal", {"density": 1.5}, r"density must be a number in \[0, 1\], got 1.5"),
        ("galore", {"proj_type": "sideways"}, "proj_type must be one of .*'std'"),
        ("apollo", {"proj": "fft"}, "proj must be one of .*'random'"),
        ("galore", {"proj": "block"}, "proj must be one of"),  # FRUGAL's mode only
        ("natural_galore", {"rank": 8, "natural_history": 0}, "natural_history must be a pos"),
        ("galore", {"rank": 8, "density": 0.25}, "give rank or density, not both"),
        ("apollo_mini", {"density": 0.25}, "apollo_mini is rank 1"),
        ("apollo_mini", {"rank": 4}, "apollo_mini is rank 1, got rank=4"),
    ],
)
def test_bad_optimizer_kwargs_are_value_errors(optimizer, kwargs, match) -> None:
    with pytest.raises(ValueError, match=f"optimizer_kwargs of '{optimizer}': {match}"):
        EstimateConfig(optimizer=optimizer, optimizer_kwargs=kwargs)
    with pytest.raises(ValueError, match=match):  # the rules' own entry point too
        optstate.optimizer_state([], optimizer, kwargs)


def test_good_optimizer_kwargs_are_accepted() -> None:
    for state_dtype in optstate.STATE_DTYPES:
        EstimateConfig(optimizer_kwargs={"state_dtype": state_dtype})
    EstimateConfig(optimizer="frugal", optimizer_kwargs={"density": 0.5, "proj": "block"})
    EstimateConfig(optimizer="natural_galore", optimizer_kwargs={"rank": 4, "natural_history": 2})
    kw: dict[str, Any] = {"rank": 4, "proj": "rsvd", "proj_type": "left", "state_dtype": "int8"}
    EstimateConfig(optimizer="galore", optimizer_kwargs=kw)


def test_estimator_value_lists_are_the_optimizers() -> None:
    """Layer 2 restates the optimizers' lists (it may not import memopt.optim): pinned here."""
    assert optstate.STATE_DTYPES == _groups.STATE_DTYPES
    assert optstate.PROJ_TYPES == projection.PROJ_TYPES
    assert set(optstate.PROJ_NAMES) == set(mo.PROJECTORS.names())
    classes = {
        "adamw": mo.AdamW, "galore": mo.GaLoreAdamW, "natural_galore": mo.NaturalGaLoreAdamW,
        "apollo": mo.ApolloAdamW, "apollo_mini": mo.ApolloMini, "frugal": mo.FrugalAdamW,
    }  # fmt: skip
    assert set(classes) == set(optstate.RULES) == set(optstate.KWARGS)
    for name, cls in classes.items():
        accepted = set(cls.base_defaults) | set(cls.low_rank_defaults)
        if name != "adamw":
            accepted |= {"rank", "density"}  # MemoptOptimizer.add_param_group
        assert set(optstate.KWARGS[name]) <= accepted, name


def test_device_kind_must_be_known() -> None:
    with pytest.raises(ValueError, match=r"device_kind must be one of \('cpu', 'cuda'\).*'tpu'"):
        estimate(CFG, device_kind="tpu", **KW)


def test_param_dtype_by_name() -> None:
    by_dtype = estimate(CFG, param_dtype=torch.bfloat16, **KW)
    for name in ("bfloat16", "bf16"):
        est = estimate(CFG, param_dtype=name, **KW)
        assert est.peak == by_dtype.peak and est.config["param_dtype"] == "bfloat16"
    cfg = EstimateConfig(param_dtype="bf16", master_dtype="fp32")
    assert (cfg.param_dtype, cfg.master_dtype) == (torch.bfloat16, torch.float32)
    for field, bad in (("param_dtype", "int3"), ("param_dtype", torch.int64),
                       ("master_dtype", "double precision")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{field} must be a floating torch.dtype or one of"):
            EstimateConfig(**{field: bad})


def test_seq_len_past_learned_positions_is_refused_rotary_is_not() -> None:
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    estimate(gpt2, batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match=r"seq_len=17 is longer than the model's 16 learned "
                       r"positions \(transformer.wpe\)"):  # fmt: skip
        estimate(gpt2, batch_size=1, seq_len=17)
    llama = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    assert estimate(llama, batch_size=1, seq_len=32).device_peak > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"optimizer": "frugal", "optimizer_kwargs": {"density": 0.0}}, "density 0 keeps no"),
     ({"master_dtype": "bfloat16"}, "master_dtype torch.bfloat16 is narrower"),
     ({"stage": 3, "layout": "whole_tensor"}, "stage 3 row-shards every parameter")],
)  # fmt: skip
def test_setups_memopt_refuses_are_not_priced(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EstimateConfig(**kwargs)


def test_target_matching_nothing_or_a_bad_regex_is_refused() -> None:
    """A target that selects no weight priced the model as all full-state (param_groups
    refuses it); a bad regex raised a bare re.error that did not name target."""
    with pytest.raises(ValueError, match=r"target 'nomatch' matched no weight of .*q_proj"):
        estimate(CFG, optimizer="galore", target="nomatch", **KW)
    with pytest.raises(ValueError, match=r"target='\[' is not a valid regex"):
        EstimateConfig(optimizer="galore", target="[")
    estimate(CFG, optimizer="adamw", target="nomatch", **KW)  # adamw projects nothing
    assert estimate(CFG, optimizer="galore", target="all-linear", **KW).device_peak > 0


def test_inputs_are_moved_to_meta_and_a_missing_one_is_named() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    on_meta = estimate(mlp, inputs={"input": torch.empty(4, 16, device="meta")})
    real = estimate(mlp, inputs={"input": torch.randn(4, 16)})  # was a device error
    assert real.peak == on_meta.peak
    with pytest.raises(ValueError, match=r"Sequential.forward takes no input_ids.*inputs="):
        estimate(mlp, batch_size=1, seq_len=8)


def test_a_config_that_is_no_causal_lm_says_what_to_pass() -> None:
    transformers = pytest.importorskip("transformers")
    t5 = transformers.T5Config(num_layers=1, d_model=32, d_ff=64, num_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match=r"T5Config is built as a causal LM .*inputs="):
        estimate(t5, **KW)


@pytest.mark.parametrize("action", ["recompute", "keep"])
def test_a_model_with_activation_policies_is_estimated(action: str) -> None:
    """memopt.activations' forward wrappers close over the real module: the meta copy ran
    the real weights ("Tensor on device meta is not on the expected device cpu")."""
    from transformers import LlamaForCausalLM

    from memopt.activations import ActivationPolicy, apply, find_blocks
    from memopt.activations.hooks import BLOCK_ATTR
    from memopt.memory.trace import ACTIVATION_BLOCK_ATTR

    assert ACTIVATION_BLOCK_ATTR == BLOCK_ATTR
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG)
    before = estimate(model, activation_policy="recompute", **KW)
    plan = {name: ActivationPolicy(action=action) for name, _ in find_blocks(model)}
    manager = apply(model, plan)  # type: ignore[arg-type]
    try:
        est = estimate(model, activation_policy="recompute", **KW)
    finally:
        manager.remove()
    assert est.peak == before.peak
    assert any("memopt.activations policies" in n for n in est.notes)
