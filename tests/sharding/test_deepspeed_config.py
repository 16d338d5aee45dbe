"""A DeepSpeed ``zero_optimization`` block maps onto memopt's config (pure Python)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import memopt
from memopt.sharding import deepspeed_config as dsc
from memopt.sharding.config import DEFAULT_BUCKET_BYTES
from memopt.sharding.deepspeed_config import (
    SUPPORTED_KEYS,
    DeepSpeedConfigWarning,
    from_deepspeed,
    read_deepspeed,
)
from tests.sharding import _train as T


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(dsc, "_warned", set())  # "once per process" starts afresh per test
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeepSpeedConfigWarning)  # an unexpected one fails
        yield


def _quiet(block: dict, **kw: object) -> dsc.DeepSpeedZero:
    return read_deepspeed(block, **kw)  # type: ignore[arg-type]


def test_stage_and_buckets_in_bytes() -> None:
    block = {"stage": 2, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    cfg = from_deepspeed(block)
    assert (cfg.stage, cfg.layout, cfg.bucket_bytes) == (2, "whole_tensor", 5 * 10**7 * 4)
    assert cfg.master_dtype is None
    # DeepSpeed counts elements: the byte size follows the gradient dtype
    assert from_deepspeed(block, param_dtype=torch.bfloat16).bucket_bytes == 10**8
    assert from_deepspeed({"stage": 1, "allgather_bucket_size": 1000}).bucket_bytes == 4000
    assert from_deepspeed({"stage": 1}).bucket_bytes == DEFAULT_BUCKET_BYTES
    assert from_deepspeed({"stage": 1, "reduce_bucket_size": "auto"}).bucket_bytes == (
        DEFAULT_BUCKET_BYTES
    )
    assert from_deepspeed({"stage": 2}, layout="dim0").layout == "dim0"
    assert from_deepspeed({"stage": 3}).layout == "dim0"  # stage 3 (FSDP2) row-shards


def test_whole_config_with_bf16(tmp_path: Path) -> None:
    whole = {
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(whole))
    for src in (whole, str(path), path):
        ds = read_deepspeed(src)
        assert (ds.stage, ds.bucket_bytes, ds.master_dtype) == (2, 2000, torch.float32)
        assert ds.ignored == ()


def test_legacy_bfloat16_key_and_a_ratio_that_is_no_number() -> None:
    # "bfloat16" is DeepSpeed's legacy name of "bf16" (still read there): fp32 masters here too
    # (it was ignored with a warning, so a bf16 model trained without masters); sweep45 F2, M3
    ds = read_deepspeed({"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    assert (ds.stage, ds.master_dtype) == (2, torch.float32)
    off = {"device": "cpu", "ratio": "auto"}
    with pytest.raises(ValueError, match=r"offload_optimizer.ratio must be a number .* 'auto'"):
        read_deepspeed({"zero_optimization": {"stage": 2, "offload_optimizer": off}})


def test_other_top_level_keys_warn_once() -> None:
    whole = {"train_batch_size": 8, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}}
    with pytest.warns(DeepSpeedConfigWarning, match="ignored: gradient_clipping, train_batch"):
        read_deepspeed(whole)
    read_deepspeed(whole)  # warned once: the "error" filter would raise on a second


def test_unknown_key_lists_supported() -> None:
    with pytest.raises(
        ValueError, match=r"DeepSpeed config: unknown zero_optimization key\(s\) \['bogus'\]"
    ):
        read_deepspeed({"stage": 2, "bogus": 1})
    with pytest.raises(ValueError, match="supported: .*reduce_bucket_size.*stage3_prefetch"):
        read_deepspeed({"stage": 2, "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['speed'\] in .*offload_optimizer"):
        read_deepspeed({"stage": 2, "offload_optimizer": {"device": "none", "speed": 1}})


@pytest.mark.parametrize(
    ("block", "exc", "match"),
    [
        ({}, ValueError, "no 'stage'"),
        ({"stage": 0}, ValueError, "stage 0 is plain data parallelism"),
        ({"stage": 4}, ValueError, "must be 1, 2 or 3"),
        ({"stage": 2, "reduce_bucket_size": -1}, ValueError, "positive element count"),
        ({"stage": 2, "reduce_bucket_size": 1.5}, ValueError, "positive element count"),
        ({"stage": 2, "overlap_comm": "yes"}, TypeError, "true/false"),
        ({"stage": 2, "offload_optimizer": {"device": "gpu"}}, ValueError, "none, cpu or nvme"),
    ],
)
def test_bad_values(block: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        read_deepspeed(block)


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"zenflow": {"topk_ratio": 0.1}}, "zenflow"),
    ],
)
def test_offload_not_implemented_names_the_issue(block: dict, key: str) -> None:
    with pytest.raises(NotImplementedError, match=f"{key}.*issue 5"):
        read_deepspeed({"stage": 3, **block})


def test_offload_param_nvme_is_mapped() -> None:
    from memopt.offload import NVMeConfig, OffloadConfig

    block = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}
    cfg = from_deepspeed(block)
    assert cfg.offload_params == "nvme" and cfg.param_nvme == NVMeConfig(directory="/nvme")
    assert cfg.offload is None
    both = from_deepspeed({**block, "offload_optimizer": {"device": "nvme", "nvme_path": "/o"}})
    assert both.offload == OffloadConfig("nvme", "/o") and both.offload_params == "nvme"
    with pytest.raises(ValueError, match="needs .nvme_path"):
        read_deepspeed({"stage": 3, "offload_param": {"device": "nvme"}})


def test_offload_none_is_mapped() -> None:
    block = {
        "stage": 2,
        "offload_optimizer": {"device": "none", "pin_memory": False, "ratio": 0.3},
        "offload_param": {"device": "none", "nvme_path": "/nvme"},
    }
    ds = read_deepspeed(block)
    assert ds.offload_optimizer == dsc.Offload("none", False, None, 0.3)
    assert ds.offload_param == dsc.Offload("none", True, "/nvme", 1.0)
    pinned = read_deepspeed({"stage": 2, "cpu_offload_use_pin_memory": False})
    assert not pinned.offload_optimizer.pin_memory


def test_matched_keys_are_silent_and_the_others_warn() -> None:
    silent = {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
              "reduce_scatter": True, "round_robin_gradients": False,
              "sub_group_size": 1e9, "stage3_prefetch_bucket_size": 123}  # fmt: skip
    assert _quiet(silent).ignored == ()  # stage-3 knobs are not read below stage 3
    for key, value, why in [
        ("contiguous_gradients", False, "contiguous buckets"),
        ("overlap_comm", False, "always overlaps"),
        ("reduce_scatter", False, "reduce-scatter"),
        ("round_robin_gradients", True, "CPU-offloaded gradients"),
        ("zero_quantized_gradients", True, "gradient dtype"),
    ]:
        with pytest.warns(DeepSpeedConfigWarning, match=f"{key}={value!r} has no effect.*{why}"):
            assert read_deepspeed({"stage": 2, key: value}).ignored == (key,)
    with pytest.warns(DeepSpeedConfigWarning, match="stage 1 reduces every gradient at step"):
        read_deepspeed({"stage": 1, "overlap_comm": True})


def test_stage3_knobs_warn_under_stage3() -> None:
    block = {"stage": 3, "stage3_prefetch_bucket_size": 1e7,
             "stage3_param_persistence_threshold": 1e5, "stage3_max_live_parameters": "auto",
             "stage3_gather_16bit_weights_on_model_save": True}  # fmt: skip
    with pytest.warns(DeepSpeedConfigWarning) as got:
        ds = read_deepspeed(block)
    assert ds.stage == 3
    assert set(ds.ignored) == {
        "stage3_prefetch_bucket_size",
        "stage3_gather_16bit_weights_on_model_save",
    }  # the DeepSpeed default (1e5) and "auto" are silent
    assert "one group ahead" in str(got[0].message)


def test_allgather_bucket_differing_warns() -> None:
    with pytest.warns(DeepSpeedConfigWarning, match="gathered over the gradient buckets"):
        ds = read_deepspeed({"stage": 2, "reduce_bucket_size": 100, "allgather_bucket_size": 50})
    assert ds.bucket_bytes == 400 and ds.ignored == ("allgather_bucket_size",)


def test_every_key_is_classified() -> None:
    assert len(SUPPORTED_KEYS) == len(set(SUPPORTED_KEYS)) > 40
    assert {"stage", "offload_param", "stage3_max_live_parameters"} <= set(SUPPORTED_KEYS)


def test_memopt_shard_takes_a_deepspeed_config() -> None:
    model = T.make_model()
    opt = T.make_optimizer("adamw", model)
    # a bare block hides the whole config's gradient_clipping: DeepSpeed's default clip is named
    with pytest.warns(DeepSpeedConfigWarning, match=r"clip_grad_norm_\(1.0\)"):
        block = {"stage": 1, "reduce_bucket_size": 64}
        _, sharded = memopt.shard(model, opt, deepspeed_config=block)
    assert (sharded.config.stage, sharded.config.bucket_bytes) == (1, 256)
    model = T.make_model()
    opt = T.make_optimizer("adamw", model)
    with pytest.raises(ValueError, match="contradict"):
        memopt.shard(model, opt, stage=1, deepspeed_config={"stage": 2})


def test_offload_tuning_knobs_warn_and_pin_memory_is_checked() -> None:
    """Offload sub-keys with no memopt counterpart warn (as top-level knobs do) instead of
    vanishing; pin_memory must be a boolean (the string "false" used to mean True)."""
    block = {"stage": 2, "offload_optimizer": {"device": "cpu", "buffer_count": 4}}
    with pytest.warns(DeepSpeedConfigWarning, match="buffer_count has no effect"):
        read_deepspeed(block)
    bad = {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": "false"}}
    with pytest.raises(ValueError, match="pin_memory must be true or false"):
        read_deepspeed(bad)
