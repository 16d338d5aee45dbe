"""``sharding.master_dtype`` at stage 0 (what ``Config.from_deepspeed({"bf16": ...})`` builds) and
``Config.from_deepspeed``'s errors on malformed blocks, which name the key."""

from __future__ import annotations

import warnings

import pytest
import torch

import memopt
from memopt import Config
from memopt.config import build
from memopt.config.workload import batches, build_model

BASE = ["model.preset=llama-tiny", "model.device=cpu", "train.batch_size=2", "train.seq_len=16",
        "data.max_bytes=20000", "optimizer.max_grad_norm=null", "optimizer.lr=1e-6"]  # fmt: skip


def _bf16_run(cfg: Config, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor, memopt.Setup]:
    """(weight before, weight after ``steps`` AdamW steps, the Setup) of one bf16 matrix."""
    torch.manual_seed(0)
    s = memopt.setup(build_model(cfg), cfg)
    w = s.raw_model.model.layers[0].mlp.up_proj.weight  # type: ignore[union-attr,index]
    before = w.detach().clone()
    data = batches(cfg)
    for _ in range(steps):
        x = next(data)
        s.model(input_ids=x, labels=x).loss.backward()
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
    after = w.detach().clone()
    return before, after, s


def test_bf16_from_deepspeed_keeps_fp32_master_weights_at_stage_0() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Config.from_deepspeed({"bf16": {"enabled": True}}).replace(BASE)
    assert (cfg.model.dtype, cfg.sharding.stage, cfg.sharding.master_dtype) == ("bf16", 0, "fp32")
    sc = build.shard_config(cfg.sharding)
    assert sc is not None and sc.master_dtype == torch.float32 and sc.stage == 1
    before, after, s = _bf16_run(cfg)
    assert after.dtype == torch.bfloat16
    masters = [p for g in s.optimizer.param_groups for p in g["params"]]
    assert masters and all(p.dtype == torch.float32 for p in masters)
    # the fp32 master of this weight moved everywhere, and the bf16 weight is its rounding
    (master,) = [
        p for p in masters if p.shape == after.shape and torch.equal(p.to(torch.bfloat16), after)
    ]
    assert (master != before.float()).float().mean().item() > 0.99
    # at lr 1e-6 a bf16 weight (ulp ~1e-4 at 0.02) cannot move by itself: without master
    # weights the update is rounded away; with them it accumulates in fp32 and reaches bf16
    changed = (after != before).float().mean().item()
    b0, a0, s0 = _bf16_run(cfg.replace(["sharding.master_dtype=auto"]))
    plain = (a0 != b0).float().mean().item()
    assert build.shard_config(s0.config.sharding) is None
    assert changed > 3 * plain, (changed, plain)
    s.close()
    s0.close()


def test_in_backward_refuses_master_weights() -> None:
    with pytest.raises(ValueError, match="sharding.master_dtype"):
        Config.from_dict({"optimizer": {"in_backward": True}, "sharding": {"master_dtype": "fp32"}})


@pytest.mark.parametrize(
    "ds,needle",
    [
        ({"gradient_clipping": "1.0"}, "'gradient_clipping'"),
        ({"gradient_clipping": -1}, "'gradient_clipping'"),
        ({"optimizer": ["AdamW"]}, "'optimizer'"),
        ({"optimizer": {"type": "AdamW", "params": None}}, "'optimizer.params'"),
        ({"scheduler": {"type": "WarmupLR", "params": None}}, "'scheduler.params'"),
        ({"scheduler": "WarmupLR"}, "'scheduler'"),
        ({"bf16": True}, "'bf16'"),
        ({"fp16": True}, "'fp16'"),
        ({"bf16": {"enabled": "yes"}}, "'bf16.enabled'"),
        (
            {"optimizer": {"type": "Adam", "params": {"weight_decay": 0.1, "adam_w_mode": False}}},
            "adam_w_mode",
        ),
    ],
)
def test_from_deepspeed_malformed_blocks_name_the_key(ds: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Config.from_deepspeed(ds)


def test_from_deepspeed_warns_about_unused_optimizer_params() -> None:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = Config.from_deepspeed({"optimizer": {"type": "AdamW", "params": {
            "lr": 3e-4, "torch_adam": True, "adam_w_mode": True, "amsgrad": False}}})  # fmt: skip
    assert cfg.optimizer.lr == 3e-4
    messages = [str(x.message) for x in w]
    assert any("ignored params ['amsgrad']" in m for m in messages), messages
    # torch_adam is not ignored: it picks torch's AdamW, whose default decay is taken (M2)
    assert cfg.optimizer.weight_decay == 0.01
    assert not any("torch_adam" in m and "ignored" in m for m in messages), messages
    # a null top-level block is no block; bf16 "auto" keeps the base's dtype
    cfg = Config.from_deepspeed({"optimizer": None, "bf16": {"enabled": "auto"}})
    assert cfg.model.dtype == "fp32" and cfg.optimizer.name == "adamw"
