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
    """The swapper's residency (stage3_offload): forward/backward holds the block read ahead,
    the block FSDP2's backward prefetch loaded, and the read's bounce; the first step (no
    read-ahead, no state yet) FSDP2's prefetched block and the largest unit's bounce;
    the step three units and two units' bounce; a pinned arena keeps two whole chunks of
    the largest unit (80% each here: capped at all the shards)."""
    fwd, step = "forward/backward", "optimizer step"
    steady = _place("cpu", None)  # state in memory: the steady forward/backward is the peak
    assert steady.forward["parameters"] == 200 and steady.forward["optimizer_state"] == 2000
    assert steady.arena == {fwd: 100, step: 900}
    assert steady.step["parameters"] == 1000 and steady.grads == 1000
    first = _place("cpu", "nvme")  # state on NVMe: the first step's 80% bounce is larger
    assert first.forward["parameters"] == 100 and first.forward["optimizer_state"] == 0
    assert first.arena[fwd] == 800 and first.step["optimizer_state"] == 1800
    gpu = _place("cuda", None)
    assert gpu.forward["parameters"] == 200 and gpu.arena == {fwd: 1000, step: 1000}


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


def _frozen_llama(frozen: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(tiny_config())
    for name, p in m.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    return m


def test_frozen_parameters_are_weights_without_gradients_or_state() -> None:
    """A frozen embedding (or a LoRA-style frozen base) is in memory as weights, with no
    gradient and no optimizer state (the estimate raised on any frozen parameter)."""
    m = _frozen_llama("model.embed_tokens")
    total = sum(p.numel() * 4 for p in m.parameters())
    trainable = sum(p.numel() * 4 for p in m.parameters() if p.requires_grad)
    assert 0 < trainable < total
    # bf16 weights with fp32 moments: the fused step's fp32 copies make the step the peak
    est = estimate(m, stage=1, world_size=1, batch_size=1, seq_len=8, param_dtype="bfloat16",
                   optimizer_kwargs={"state_dtype": "float32"})  # fmt: skip
    dev = est.breakdown["device"]
    assert est.phase == "optimizer step"
    assert dev["parameters"] == total // 2
    assert dev["gradients"] == trainable // 2 and dev["optimizer_state"] == 2 * trainable
    assert dev["temporaries"] == 2 * trainable  # fp32 weight + gradient copies
    # stage 3 row-shards the frozen weights with the rest (FSDP2 shards every parameter)
    z3 = estimate(m, stage=3, world_size=2, batch_size=1, seq_len=8)
    assert z3.breakdown["device"]["parameters"] == pytest.approx(total / 2, rel=0.02)
    # all frozen but the head: the units gathered at stage 3 are still whole (frozen) blocks
    from memopt.memory.estimate import EstimateConfig, find_units
    from memopt.memory.sharding import shard_share

    lora = _frozen_llama("model")
    z3l = estimate(lora, stage=3, world_size=2, batch_size=1, seq_len=8)
    assert z3l.breakdown["device"]["parameters"] == pytest.approx(total / 2, rel=0.02)
    infos = param_infos(lora)
    units = find_units(lora, EstimateConfig(stage=3))
    share = shard_share(infos, "adamw", {}, 3, 2, "dim0", units,
                        frozen_bytes=total - sum(p.nbytes for p in infos))  # fmt: skip
    assert share.gathered == units > sum(p.nbytes for p in infos)


@pytest.mark.parametrize("model", ["frozen", "no_params"])
def test_nothing_to_train_is_a_value_error(model) -> None:
    module = (
        _frozen_llama("")  # every name starts with "": all frozen
        if model == "frozen"
        else torch.nn.Sequential(torch.nn.ReLU())
    )
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate(module, batch_size=1, seq_len=8)


def test_swap_and_offload_name_the_pinned_arena_chunks(base) -> None:
    """The pinned tier counts the bytes requested; the shared arena maps and pins whole
    256 MiB chunks (what a measured run's RSS shows): the notes say how many."""
    from memopt.memory.estimate import ARENA_CHUNK_BYTES
    from memopt.offload import ArenaConfig

    assert ARENA_CHUNK_BYTES == ArenaConfig().chunk_bytes  # default_arena's chunks
    swap = estimate(CFG, activation_policy="swap", **KW)
    assert 0 < swap.peak["pinned_host"] < ARENA_CHUNK_BYTES
    note = [n for n in swap.notes if n.startswith("pinned arena")]
    assert len(note) == 1 and "1 chunk(s) = 256.00 MiB" in note[0]
    cpu = estimate(CFG, stage=1, offload="cpu", **KW)
    assert any(n.startswith("pinned arena") for n in cpu.notes)
    assert not any(n.startswith("pinned arena") for n in base.notes)


def test_policy_without_blocks_says_so() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = {"input": torch.empty(4, 16, device="meta")}
    rec = estimate(mlp, inputs=x, activation_policy="recompute")
    assert any("no repeated blocks" in n for n in rec.notes)
    assert rec.peak == estimate(mlp, inputs=x).peak


def test_bucket_bytes_reaches_the_estimate() -> None:
    """Stages 1/2 keep each reduced bucket in which the rank owns a tensor (its gradient is a
    view of the bucket): one big bucket keeps every gradient on every rank, small ones about
    half on each of 2 ranks; gather_params then allocates every bucket at once."""
    from transformers import LlamaForCausalLM

    from memopt.memory.sharding import rank_shares

    with torch.device("meta"):
        infos = param_infos(LlamaForCausalLM(CFG))
    total = sum(p.nbytes for p in infos)
    one = rank_shares(infos, 1, 2, "whole_tensor", bucket_bytes=2**30)
    small = rank_shares(infos, 1, 2, "whole_tensor", bucket_bytes=2**12)
    assert [s.grads for s in one] == [total, total]
    assert all(0.4 * total < s.grads < 0.7 * total for s in small)
    assert [s.buckets for s in one] == [s.buckets for s in small] == [total, total]
    kw = {"stage": 1, "world_size": 2, "batch_size": 1, "seq_len": 8}
    grads = [estimate(CFG, bucket_bytes=b, **kw).breakdown["device"]["gradients"]
             for b in (2**12, 2**30)]  # fmt: skip
    assert grads[0] < grads[1]


def test_recompute_estimate_from_a_config_without_cache() -> None:
    """memopt.config.estimate traces as memopt run trains (use_cache off, no .item() error);
    AdamW gets no rank/proj (as memopt.config.build), which the estimator would refuse."""
    from memopt import Config
    from memopt.config.estimate import estimate as config_estimate
    from memopt.config.estimate import estimate_kwargs

    cfg = Config.from_dict({
        "optimizer": {"name": "adamw", "rank": 64, "proj": "svd"},
        "model": {"preset": "llama-tiny"},
        "activations": {"policy": "recompute"},
        "train": {"batch_size": 2, "seq_len": 64},
    })  # fmt: skip
    assert estimate_kwargs(cfg)["optimizer_kwargs"] == {}
    rec = config_estimate(cfg).breakdown["device"]["activations"]
    keep = config_estimate(Config.from_dict({**cfg.to_dict(), "activations": {}}))
    assert rec < 0.5 * keep.breakdown["device"]["activations"]


def test_mixed_precision_state_is_sized_as_the_optimizer_keeps_it() -> None:
    """bf16 parameters: with fp32 masters the optimizer steps fp32 tensors (fp32 moments);
    the offload AdamW pipeline keeps fp32 moments and masters on the tier, while int8 or
    low-rank state offloads without a tier master; at stage 3 the fp32 shards are the masters
    (no second copy). The estimate used bf16 moments and added masters where none exist."""
    bf16 = dict(param_dtype=torch.bfloat16, batch_size=1, seq_len=16)

    def dev(e: MemoryEstimate, key: str) -> int:
        return e.breakdown["device"][key]

    plain = estimate(CFG, optimizer="adamw", stage=2, **bf16)
    master = estimate(CFG, optimizer="adamw", stage=2, master_dtype=torch.float32, **bf16)
    assert dev(master, "optimizer_state") == 2 * dev(plain, "optimizer_state")
    assert dev(master, "master_weights") == 2 * dev(plain, "parameters")

    pipe = estimate(CFG, optimizer="adamw", stage=1, offload="cpu", **bf16)
    assert pipe.breakdown["pinned_host"]["optimizer_state"] == dev(master, "optimizer_state")
    assert pipe.breakdown["pinned_host"]["master_weights"] == dev(master, "master_weights")
    own = estimate(CFG, optimizer="adamw", stage=1, offload="cpu",
                   optimizer_kwargs={"state_dtype": "int8"}, **bf16)  # fmt: skip
    assert own.breakdown["pinned_host"]["master_weights"] == 0

    s3 = estimate(CFG, optimizer="adamw", stage=3, world_size=2, **bf16)
    s3m = estimate(CFG, optimizer="adamw", stage=3, world_size=2,
                   master_dtype=torch.float32, **bf16)  # fmt: skip
    assert dev(s3m, "master_weights") == 0
    assert dev(s3m, "parameters") == 2 * dev(s3, "parameters")
