"""What a DeepSpeed run does by default, carried into memopt (sweep26 findings 3, 4, 5, 9):
the bf16 cast keeps non-persistent buffers (RoPE ``inv_freq``) fp32, the scheduler keys a
config leaves out take DeepSpeed's defaults, an optimizer without a scheduler is a constant lr,
an absent ``gradient_clipping`` is DeepSpeed's 1.0, and a stage-0 block is still validated."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt import Config
from memopt.config import cast_model
from memopt.config.build import lr_lambda
from memopt.config.workload import batches, build_model

TINY = ["model.preset=llama-tiny", "model.device=cpu", "train.batch_size=2", "train.seq_len=16",
        "data.max_bytes=20000"]  # fmt: skip


def _from_ds(ds: dict[str, Any], base: Config | None = None) -> tuple[Config, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = Config.from_deepspeed(ds, base=base)
    return cfg, [str(x.message) for x in w]


def test_bf16_setup_casts_parameters_and_keeps_rope_inv_freq_fp32() -> None:
    """DeepSpeed's bf16 engine casts the parameters only (engine.py, "preserve fp32 buffers
    (e.g. rotary inv_freq)"); memopt.setup used model.to(bf16), which rounded inv_freq and
    changed the very first loss."""
    cfg = Config.from_dict({}).replace([*TINY, "model.dtype=bf16"])
    model = build_model(cfg.replace(["model.dtype=fp32"]))
    reference = copy.deepcopy(model)
    for p in reference.parameters():  # what DeepSpeed does
        p.data = p.data.to(torch.bfloat16)
    inv_freq = model.model.rotary_emb.inv_freq.clone()  # type: ignore[union-attr]
    s = memopt.setup(model, cfg)
    assert all(p.dtype == torch.bfloat16 for p in s.raw_model.parameters())
    got = s.raw_model.model.rotary_emb.inv_freq  # type: ignore[union-attr]
    assert got.dtype == torch.float32 and torch.equal(got, inv_freq)
    x = next(batches(cfg))
    with torch.no_grad():
        assert torch.equal(s.model(input_ids=x, labels=x).loss,
                           reference(input_ids=x, labels=x).loss)  # fmt: skip
    s.close()
    # memopt run's model (built in bf16 from the start) keeps it too
    built = build_model(cfg).model.rotary_emb.inv_freq  # type: ignore[union-attr]
    assert built.dtype == torch.float32 and torch.equal(built, inv_freq)


def test_cast_model_casts_persistent_buffers_so_batch_norm_still_runs() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].register_buffer("table", torch.linspace(0, 1, 4), persistent=False)
    assert cast_model(model, torch.bfloat16) is model
    bn = model[1]
    assert model[0].weight.dtype == bn.running_mean.dtype == torch.bfloat16
    assert bn.num_batches_tracked.dtype == torch.int64 and bn.table.dtype == torch.float32
    assert model(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # back to fp32: everything widens (a non-persistent buffer is never rounded, only widened)
    model[1].table = model[1].table.to(torch.bfloat16)
    cast_model(model, torch.float32)
    assert {t.dtype for t in (*model.parameters(), bn.running_mean, bn.table)} == {torch.float32}
    with pytest.raises(ValueError, match="floating dtype"):
        cast_model(model, torch.int8)


def test_scheduler_keys_left_out_take_deepspeeds_defaults() -> None:
    opt = {"type": "AdamW", "params": {"lr": 3e-4}}
    # WarmupCosineLR: warm-up 1000 steps (log: warned), cosine floor 1e-4 of the lr
    cfg, msgs = _from_ds({"optimizer": opt, "scheduler": {"type": "WarmupCosineLR",
                                                          "params": {"total_num_steps": 3000}}})
    o = cfg.optimizer
    assert (o.schedule, o.warmup_steps, o.min_lr_ratio, o.lr) == ("cosine", 1000, 1e-4, 3e-4)
    assert lr_lambda(o, cfg.train.steps)(3000) == pytest.approx(1e-4)
    assert any("warmup_type 'log' (DeepSpeed default)" in m for m in msgs), msgs
    # WarmupDecayLR peaks at its own default 1e-3, not at the optimizer's lr (said)
    cfg, msgs = _from_ds({"optimizer": opt, "scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 3000, "warmup_type": "linear"}}})  # fmt: skip
    assert (cfg.optimizer.lr, cfg.optimizer.warmup_steps) == (1e-3, 1000)
    assert any("no warmup_max_lr" in m and "0.0003" in m for m in msgs), msgs
    # WarmupLR: warm-up 1000 steps to the optimizer's lr, then constant
    cfg, msgs = _from_ds({"optimizer": opt, "scheduler": {"type": "WarmupLR"}})
    o = cfg.optimizer
    assert (o.schedule, o.warmup_steps, o.lr) == ("constant", 1000, 3e-4)
    assert any("warmup_type 'log'" in m for m in msgs), msgs
    # "auto" (the HF integration's placeholder) still keeps base's values
    base = Config.from_dict({"optimizer": {"warmup_steps": 7, "lr": 2e-4}})
    cfg, _ = _from_ds({"scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_num_steps": "auto", "warmup_max_lr": "auto", "total_num_steps": 50}}}, base)
    assert (cfg.optimizer.warmup_steps, cfg.optimizer.lr) == (7, 2e-4)


def test_an_optimizer_without_a_scheduler_trains_at_a_constant_lr() -> None:
    base = Config.from_dict({"optimizer": {"schedule": "cosine", "warmup_steps": 5}})
    cfg, msgs = _from_ds({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}, base)
    o = cfg.optimizer
    assert (o.schedule, o.warmup_steps) == ("constant", 0)
    assert {lr_lambda(o, cfg.train.steps)(k) for k in range(cfg.train.steps)} == {1.0}
    assert any("without a scheduler" in m and "base had cosine, 5" in m for m in msgs), msgs
    # neither block: the schedule came from the caller's code, base's stays
    cfg, msgs = _from_ds({"train_micro_batch_size_per_gpu": 2}, base)
    assert (cfg.optimizer.schedule, cfg.optimizer.warmup_steps) == ("cosine", 5)


def test_absent_gradient_clipping_is_deepspeeds_default_one() -> None:
    unclipped = Config.from_dict({"optimizer": {"max_grad_norm": None}})
    cfg, msgs = _from_ds({"train_micro_batch_size_per_gpu": 2}, unclipped)
    assert cfg.optimizer.max_grad_norm == 1.0
    assert any("no gradient_clipping" in m and "base had None" in m for m in msgs), msgs
    cfg, msgs = _from_ds({"gradient_clipping": 0}, Config())
    assert cfg.optimizer.max_grad_norm is None and not msgs
    cfg, msgs = _from_ds({"gradient_clipping": "auto"}, unclipped)
    assert cfg.optimizer.max_grad_norm is None and not msgs


def test_a_stage_0_block_is_validated() -> None:
    with pytest.raises(ValueError, match=r"unknown zero_optimization key\(s\) \['bogus'\]"):
        Config.from_deepspeed({"zero_optimization": {"stage": 0, "bogus": 1}})
    with pytest.raises(ValueError, match="offload_optimizer at stage 0"):
        Config.from_deepspeed({"zero_optimization": {"stage": 0,
                                                     "offload_optimizer": {"device": "cpu"}}})
    cfg, _ = _from_ds({"zero_optimization": {"stage": 0, "reduce_bucket_size": 100}})
    assert (cfg.sharding.stage, cfg.sharding.offload) == (0, "none")


def test_torch_adam_gets_torchs_decay_and_adamw_ignores_adam_w_mode() -> None:
    cfg, msgs = _from_ds({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    assert cfg.optimizer.weight_decay == 0.01
    assert any("torch_adam without weight_decay" in m for m in msgs), msgs
    cfg, _ = _from_ds({"optimizer": {"type": "Adam", "params": {"torch_adam": True,
                                                                "weight_decay": 0.0}}})
    assert cfg.optimizer.weight_decay == 0.0
    # DeepSpeed: type AdamW decays decoupled whatever adam_w_mode says
    cfg, _ = _from_ds({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1,
                                                                 "adam_w_mode": False}}})
    assert cfg.optimizer.weight_decay == 0.1
