"""``estimate``: the breakdown sums, ZeRO stage scaling, tiers, inputs and validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memopt.memory import MemoryEstimate, estimate
from memopt.memory.model import param_infos
from memopt.memory.optstate import optimizer_state
from memopt.memory.result import CATEGORIES, TIERS
from memopt.memory.stage3_offload import Stage3Placement, UnitSizes, place_stage3
from tests.memory.conftest import tiny_config

CFG = tiny_config(hidden=128, layers=4, vocab=1000)
KW = {"batch_size": 8, "seq_len": 64}  # activations outweigh the step: peak in backward


@pytest.fixture(scope="module")
def base() -> MemoryEstimate:
    return estimate(CFG, **KW)


def _param_bytes() -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(CFG)
    return sum(p.numel() for p in m.parameters()) * 4


def test_breakdown_sums_to_peak(base) -> None:
    for tier, cats in base.breakdown.items():
        assert base.peak[tier] == sum(cats.values())
    dev = base.breakdown["device"]
    assert dev["parameters"] == _param_bytes()
    assert dev["optimizer_state"] == 2 * _param_bytes()  # AdamW fp32: two moments
    assert base.phase == "forward/backward" and dev["activations"] > 0
    assert base.host_total == base.peak["device"]  # CPU: device bytes are host RAM
    d = base.to_dict()
    assert d["peak"]["device"] == base.device_peak and d["config"]["stage"] == 0
    text = str(base)
    assert "| optimizer_state |" in text and "CPU run" in text


def test_stage_scaling() -> None:
    w = 4
    s0 = estimate(CFG, optimizer="adamw", **KW)
    s1 = estimate(CFG, optimizer="adamw", stage=1, world_size=w, **KW)
    s3 = estimate(CFG, optimizer="adamw", stage=3, world_size=w, **KW)
    st0 = s0.breakdown["device"]["optimizer_state"]
    st1 = s1.breakdown["device"]["optimizer_state"]
    # whole_tensor owners: 1/W of the state, plus at most the largest parameter's state
    largest = 2 * 4 * 1000 * 128  # embedding / head state
    assert st0 / w <= st1 <= st0 / w + largest
    # stage 3 (dim0 rows): parameters 1/W on every rank (+ rounding of rows)
    p0 = s0.breakdown["device"]["parameters"]
    assert s3.breakdown["device"]["parameters"] == pytest.approx(p0 / w, rel=0.02)
    assert s3.device_peak < s1.device_peak < s0.device_peak


def test_galore_state_matches_rules() -> None:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(CFG)
    est = estimate(m, optimizer="galore", optimizer_kwargs={"rank": 16}, **KW)
    rules = optimizer_state(param_infos(m), "galore", {"rank": 16})
    assert est.breakdown["device"]["optimizer_state"] == rules.memory
    assert (
        est.breakdown["device"]["optimizer_state"]
        < estimate(m, **KW).breakdown["device"]["optimizer_state"]
    )


def test_offload_moves_state_to_host_tiers(base) -> None:
    cpu = estimate(CFG, stage=1, offload="cpu", **KW)
    assert cpu.breakdown["device"]["optimizer_state"] == 0
    state = base.breakdown["device"]["optimizer_state"]
    assert cpu.breakdown["pinned_host"]["optimizer_state"] == state
    assert cpu.breakdown["pinned_host"]["master_weights"] == _param_bytes()
    nvme = estimate(CFG, stage=1, offload="nvme", **KW)
    assert nvme.breakdown["disk"]["optimizer_state"] == state
    assert 0 < nvme.peak["pinned_host"] <= 3 * 64 * 2**20


def test_stage3_offload_places_shards_and_state() -> None:
    z3 = estimate(CFG, stage=3, world_size=2, device_kind="cuda", **KW)
    shards = z3.breakdown["device"]["parameters"]
    state = z3.breakdown["device"]["optimizer_state"]
    # parameter shards on NVMe: the disk holds them all, memory two units (in use + ahead)
    nv = estimate(CFG, stage=3, world_size=2, device_kind="cuda", offload_params="nvme", **KW)
    assert nv.breakdown["disk"]["parameters"] == shards
    assert 0 < nv.breakdown["device"]["parameters"] < shards
    assert 0 < nv.breakdown["pinned_host"]["temporaries"] < shards  # the bounce arena
    # + optimizer state on NVMe: none of it in memory outside the optimizer step
    both = estimate(CFG, stage=3, world_size=2, device_kind="cuda", offload_params="nvme",
                    offload="nvme", **KW)  # fmt: skip
    assert both.breakdown["disk"]["optimizer_state"] == state
    assert both.device_peak < nv.device_peak
    # FSDP2's CPU offload on a GPU run: shards, gradients and state on pinned host memory
    cpu = estimate(CFG, stage=3, world_size=2, device_kind="cuda", offload_params="cpu", **KW)
    host = cpu.breakdown["pinned_host"]
    assert host["parameters"] == shards and host["optimizer_state"] == state
    assert cpu.breakdown["device"]["parameters"] == 0


def _place(device_kind: str, offload: str | None) -> Stage3Placement:
    cfg = SimpleNamespace(device_kind=device_kind, offload=offload, offload_params="nvme")
    tiers = {t: dict.fromkeys(CATEGORIES, 0) for t in TIERS}
    units = UnitSizes([10, 10], 100)  # two blocks of 10% and a root unit of 80%
    held = {"optimizer_state": 2000, "master_weights": 0}
    return place_stage3(cfg, tiers, {"parameters": 1000, "buffers": 0}, held, 1000, units)


def test_stage3_nvme_params_follow_the_swapper_moments() -> None:
    """The swapper's residency (stage3_offload): forward/backward holds the block read ahead
    and its bounce; the first step (no read-ahead, no state yet) the largest unit's bounce;
    the step three units and two units' bounce; a pinned arena keeps two whole chunks of
    the largest unit (80% each here: capped at all the shards)."""
    fwd, step = "forward/backward", "optimizer step"
    steady = _place("cpu", None)  # state in memory: the steady forward/backward is the peak
    assert steady.forward["parameters"] == 100 and steady.forward["optimizer_state"] == 2000
    assert steady.arena == {fwd: 100, step: 900}
    assert steady.step["parameters"] == 1000 and steady.grads == 1000
    first = _place("cpu", "nvme")  # state on NVMe: the first step's 80% bounce is larger
    assert first.forward["parameters"] == 0 and first.forward["optimizer_state"] == 0
    assert first.arena[fwd] == 800 and first.step["optimizer_state"] == 1800
    gpu = _place("cuda", None)
    assert gpu.forward["parameters"] == 100 and gpu.arena == {fwd: 1000, step: 1000}


def test_recompute_and_swap_lower_device_activations(base) -> None:
    rec = estimate(CFG, activation_policy="recompute", **KW)
    swap = estimate(CFG, activation_policy="swap", **KW)
    acts = base.breakdown["device"]["activations"]
    assert rec.breakdown["device"]["activations"] < 0.5 * acts
    assert swap.breakdown["device"]["activations"] < acts
    assert swap.breakdown["pinned_host"]["activations"] > 0


def test_module_on_cpu_is_described_not_copied(tiny_llama) -> None:
    est = estimate(tiny_llama, batch_size=1, seq_len=16)
    assert est.breakdown["device"]["parameters"] == sum(
        p.numel() * 4 for p in tiny_llama.parameters()
    )
    assert all(p.device.type == "cpu" for p in tiny_llama.parameters())


def test_bf16_halves_parameters(base) -> None:
    bf = estimate(CFG, param_dtype=torch.bfloat16, **KW)
    assert bf.breakdown["device"]["parameters"] * 2 == base.breakdown["device"]["parameters"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "lion"}, "optimizer='lion' unknown"),
        ({"stage": 4}, "stage must be 0, 1, 2 or 3"),
        ({"world_size": 0}, "world_size must be a positive int"),
        ({"activation_policy": "drop"}, "activation_policy must be"),
        ({"offload": "tape"}, "offload must be None"),
        ({"offload_params": "nvme"}, "needs stage=3"),
        ({"stage": 3, "offload_params": "tape"}, "offload_params must be None"),
    ],
)
def test_bad_config_is_a_value_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        estimate(CFG, **kwargs)


def test_bad_model_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="nn.Module or a transformers config"):
        estimate("llama")
