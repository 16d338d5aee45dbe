"""``Config.from_deepspeed`` against a user's ``base`` recipe (sweep45 F2, F3, M7, M4):
the optimizer block's AdamW replacing base's low-rank optimizer is warned about, params the
block leaves out take DeepSpeed's optimizer defaults (warned where base differs), the legacy
``bfloat16`` key reads as ``bf16``, a dropped ``pin_memory: false`` is warned about, and the
warnings point at the caller's line."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from memopt import Config

GALORE = Config().replace(["optimizer.name=galore", "optimizer.rank=64", "optimizer.lr=0.01",
                           "optimizer.betas=[0.9,0.95]", "optimizer.eps=1e-6",
                           "optimizer.weight_decay=0.1", "optimizer.schedule=constant",
                           "optimizer.warmup_steps=0"])  # fmt: skip


def _from_ds(ds: dict[str, Any], base: Config | None = None) -> tuple[Config, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = Config.from_deepspeed({"gradient_clipping": 1.0, **ds}, base=base)
    return cfg, [str(x.message) for x in w]


def test_block_replacing_base_low_rank_optimizer_is_warned() -> None:
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}}}  # fmt: skip
    cfg, msgs = _from_ds(ds, GALORE)
    assert cfg.optimizer.name == "adamw"  # what DeepSpeed's block runs
    hit = [m for m in msgs if "replaces base's 'galore'" in m]
    assert len(hit) == 1, msgs
    assert "drop the optimizer block" in hit[0] and "optimizer.name=galore" in hit[0]
    # "auto" keeps base's values: nothing else to say
    o = cfg.optimizer
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay) == (0.01, (0.9, 0.95), 1e-6, 0.1)
    assert len(msgs) == 1, msgs
    # base already AdamW: no such warning
    _, msgs = _from_ds(ds, GALORE.replace(["optimizer.name=adamw"]))
    assert not any("replaces base's" in m for m in msgs), msgs


def test_params_left_out_take_deepspeed_defaults_warned_where_base_differs() -> None:
    cfg, msgs = _from_ds({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}, GALORE)
    o = cfg.optimizer
    # DeepSpeed 0.19.8 FusedAdam / DeepSpeedCPUAdam: betas (0.9, 0.999), eps 1e-8, decay 0
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay) == (3e-4, (0.9, 0.999), 1e-8, 0.0)
    hit = [m for m in msgs if "DeepSpeed's optimizer defaults" in m]
    assert len(hit) == 1, msgs
    for part in ("betas: (0.9, 0.999) (base had (0.9, 0.95))", "eps: 1e-08 (base had 1e-06)",
                 "weight_decay: 0.0 (base had 0.1)"):  # fmt: skip
        assert part in hit[0], hit[0]
    assert "lr" not in hit[0].split("base's:")[1].split(";")[0]
    # with the default base the values coincide: no warning (eps null: AdamW's own 1e-8)
    cfg, msgs = _from_ds({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}})
    assert not any("defaults" in m for m in msgs), msgs
    assert (tuple(cfg.optimizer.betas), cfg.optimizer.weight_decay) == ((0.9, 0.999), 0.0)


def test_lr_left_out_is_deepspeeds_unless_the_scheduler_gives_the_peak() -> None:
    cfg, msgs = _from_ds({"optimizer": {"type": "Adam"}}, GALORE)
    assert cfg.optimizer.lr == 1e-3 and any("lr: 0.001 (base had 0.01)" in m for m in msgs)
    sched = {"type": "WarmupLR", "params": {"warmup_max_lr": 5e-4, "warmup_num_steps": 10,
                                            "warmup_type": "linear"}}  # fmt: skip
    cfg, msgs = _from_ds({"optimizer": {"type": "Adam"}, "scheduler": sched}, GALORE)
    assert cfg.optimizer.lr == 5e-4 and not any("lr: 0.001" in m for m in msgs), msgs


def test_torch_adam_without_decay_is_torch_adamws_001() -> None:
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "torch_adam": True}}}
    cfg, msgs = _from_ds(ds, GALORE)
    assert cfg.optimizer.weight_decay == 0.01
    assert not any("weight_decay: 0.0 (" in m for m in msgs), msgs
    assert sum("torch_adam without weight_decay" in m for m in msgs) == 1, msgs


@pytest.mark.parametrize("extra", [{}, {"bf16": {"enabled": True}}])
def test_legacy_bfloat16_key_reads_as_bf16(extra: dict[str, Any]) -> None:
    ds = {"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2}, **extra}
    cfg, msgs = _from_ds(ds)
    assert (cfg.model.dtype, cfg.sharding.master_dtype) == ("bf16", "fp32")
    assert not any("bfloat16" in m for m in msgs), msgs


def test_legacy_bfloat16_key_disagreeing_with_bf16_or_malformed_raises() -> None:
    with pytest.raises(ValueError, match="'bf16'.*'bfloat16'.*disagree"):
        Config.from_deepspeed({"bf16": {"enabled": False}, "bfloat16": {"enabled": True}})
    with pytest.raises(ValueError, match="'bfloat16'"):
        Config.from_deepspeed({"bfloat16": True})


def test_offload_pin_memory_false_is_warned_and_warnings_point_at_the_caller() -> None:
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                  "pin_memory": False}},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}, "unknown_key": 1}  # fmt: skip
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = Config.from_deepspeed(ds, base=GALORE)
    assert cfg.sharding.offload == "cpu"
    ours = [x for x in w if str(x.message).startswith("Config.from_deepspeed")]
    assert any("offload_optimizer.pin_memory: false" in str(x.message) for x in ours), ours
    assert len(ours) >= 4 and all(x.filename == __file__ for x in ours), [
        (x.filename, str(x.message)[:60]) for x in ours]
