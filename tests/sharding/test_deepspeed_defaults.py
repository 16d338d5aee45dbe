"""``memopt.shard(deepspeed_config=...)`` says what DeepSpeed's engine would have done by default
and memopt leaves to the caller (sweep26 findings 5, 6, 9): the clip at 1.0 without
``gradient_clipping``, fp16 loss scaling; and a whole config without a ``zero_optimization``
block is named as such instead of being read as the block."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import memopt
from memopt.sharding import deepspeed_config as dsc
from memopt.sharding.deepspeed_config import DeepSpeedConfigWarning, from_deepspeed
from tests.sharding import _train as T


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(dsc, "_warned", set())  # "once per process" starts afresh per test
    yield


def _shard_warnings(cfg: dict[str, Any]) -> list[str]:
    model = T.make_model()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        memopt.shard(model, T.make_optimizer("adamw", model), deepspeed_config=cfg)
    return [str(x.message) for x in w if issubclass(x.category, DeepSpeedConfigWarning)]


def test_deepspeeds_default_clip_is_named_once() -> None:
    whole = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}
    msgs = _shard_warnings(whole)
    clip = [m for m in msgs if "clips the gradient norm at 1.0" in m]
    assert len(clip) == 1 and "clip_grad_norm_(1.0)" in clip[0], msgs
    assert not any("clips the gradient norm" in m for m in _shard_warnings(whole))  # once
    # a config that sets gradient_clipping: only the "ignored" list names it
    msgs = _shard_warnings({"zero_optimization": {"stage": 2}, "gradient_clipping": 0})
    assert not any("clips" in m for m in msgs), msgs
    # a bare block cannot show the whole config's gradient_clipping: said too
    msgs = _shard_warnings({"stage": 1})
    assert any("only the zero_optimization block was given" in m for m in msgs), msgs


def test_fp16_loss_scaling_is_said_to_have_no_effect() -> None:
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    msgs = _shard_warnings({"zero_optimization": {"stage": 1}, "fp16": fp16,
                            "gradient_clipping": 0})  # fmt: skip
    (note,) = [m for m in msgs if "loss scal" in m]
    assert "no loss scaler" in note and "initial_scale_power" in note and "bf16" in note
    msgs = _shard_warnings({"zero_optimization": {"stage": 1}, "gradient_clipping": 0,
                            "fp16": {"enabled": False, "loss_scale": 0}})  # fmt: skip
    assert not any("loss scaler" in m for m in msgs), msgs


def test_a_whole_config_without_zero_optimization_is_named() -> None:
    whole = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}  # fmt: skip
    with pytest.raises(ValueError, match="whole DeepSpeed config .* without a zero_optimization"):
        from_deepspeed(whole)
    # a bare block with a typo is still an unknown key, not a whole config
    with pytest.raises(ValueError, match=r"unknown zero_optimization key\(s\) \['stag'\]"):
        from_deepspeed({"stage": 2, "stag": 1})
