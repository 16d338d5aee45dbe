"""memopt.Config: YAML round trip, dotted overrides and their errors, eager validation,
the DeepSpeed JSON mapping, and docs/config.md kept in step with the dataclasses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from memopt import Config
from memopt.config import OptimizerConfig, ShardingConfig, build
from memopt.config.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """
model: {preset: llama-tiny, overrides: {num_hidden_layers: 3}}
train: {steps: 7, batch_size: 2, seq_len: 32}
optimizer: {name: galore, rank: 8, lr: 3e-3, betas: [0.9, 0.95]}
sharding: {stage: 2, bucket_bytes: 8MiB}
activations: {policies: {model.layers.0: recompute}}
checkpoint: {directory: ck, every_n_steps: 5}
"""


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    cfg = Config.from_yaml(path)
    assert cfg.optimizer.lr == 3e-3 and isinstance(cfg.optimizer.lr, float)  # YAML 1.1: a str
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.sharding.bucket_bytes == 8 << 20
    assert cfg.model.overrides == {"num_hidden_layers": 3}
    assert cfg.activations.policies == {"model.layers.0": "recompute"}
    out = tmp_path / "out.yaml"
    cfg.to_yaml(out)
    assert Config.from_yaml(out) == cfg
    assert Config.from_yaml(tmp_path / "out.yaml").to_yaml() == cfg.to_yaml()


def test_policy_override_keeps_the_dots_of_a_block_name() -> None:
    cfg = Config().replace(["activations.policies.model.layers.0=recompute",
                            "activations.policies.model.layers.1=swap"])  # fmt: skip
    assert cfg.activations.policies == {"model.layers.0": "recompute", "model.layers.1": "swap"}


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    # plain YAML keeps the last value silently; the run would train at the other lr
    path = tmp_path / "dup.yaml"
    path.write_text("optimizer:\n  lr: 1.0e-3\n  rank: 4\n  lr: 3.0e-4\ntrain: {steps: 2}\n")
    with pytest.raises(ValueError, match=r"dup.yaml: .*key 'lr' appears twice \(lines 2 and 4\)"):
        Config.from_yaml(path)
    path.write_text("train: {steps: 2}\noptimizer: {lr: 1.0e-3}\ntrain: {seed: 1}\n")
    with pytest.raises(ValueError, match=r"key 'train' appears twice \(lines 1 and 3\)"):
        Config.from_yaml(path)


def test_overrides_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    cfg = Config.from_yaml(path, overrides=[
        "optimizer.lr=1e-4", "train.steps=50", "sharding.bucket_bytes=1GiB",
        "optimizer.betas=[0.8, 0.9]", "optimizer.max_grad_norm=null",
        "model.overrides.hidden_size=96", "optimizer.in_backward=false", "sharding.stage=1",
    ])  # fmt: skip
    assert cfg.optimizer.lr == 1e-4 and cfg.train.steps == 50
    assert cfg.sharding.bucket_bytes == 1 << 30 and cfg.sharding.stage == 1
    assert cfg.optimizer.betas == (0.8, 0.9) and cfg.optimizer.max_grad_norm is None
    assert cfg.model.overrides == {"num_hidden_layers": 3, "hidden_size": 96}
    assert cfg.replace(["train.seed=4"]).train.seed == 4


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optimizer.lrr=1", "'optimizer.lrr'"),
        ("optimizer.lr=fast", "'optimizer.lr'"),
        ("sharding.stage=4", "'sharding.stage'"),
        ("sharding.offload=disk", "'sharding.offload'"),
        ("train.steps=2.5", "'train.steps'"),
        ("train.steps=0", "'train.steps'"),
        ("optimizer.betas=[0.9]", "'optimizer.betas'"),
        ("sharding.bucket_bytes=lots", "'sharding.bucket_bytes'"),
        ("bogus.x=1", "bogus"),
        ("train=3", "section and a key"),
        ("optimizer.lr", "key=value"),
        ("sharding.offload=nvme", "sharding.nvme_path"),
        ("optimizer.lr=.nan", "'optimizer.lr' must be finite"),
        ("optimizer.lr=.inf", "'optimizer.lr' must be finite"),
        ("optimizer.betas=[0.9,1.5]", "'optimizer.betas' must each lie in [0, 1)"),
        ("optimizer.eps=-1", "'optimizer.eps'"),
        ("optimizer.min_lr_ratio=2", "'optimizer.min_lr_ratio' is a fraction"),
        ("sharding.hybrid_update=true", "needs sharding.offload"),
        ("optimizer.max_grad_norm=.nan", "'optimizer.max_grad_norm' must be finite and > 0"),
        ("optimizer.max_grad_norm=0", "'optimizer.max_grad_norm' must be finite and > 0"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        Config.from_dict({}, [override])
    assert needle in str(e.value)


def test_apollo_mini_rank_checked_when_the_config_is_read() -> None:
    # (the optimizer refuses it too, but only once it is built, after the model)
    with pytest.raises(ValueError, match="'optimizer.rank' is 4 but apollo_mini is rank 1"):
        Config.from_dict({"optimizer": {"name": "apollo_mini", "rank": 4}})
    assert Config.from_dict({"optimizer": {"name": "apollo_mini", "rank": 1}}).optimizer.rank == 1
    assert Config.from_dict({"optimizer": {"name": "apollo", "rank": 4}}).optimizer.rank == 4


def test_unknown_key_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="update_proj_gap") as e:
        Config.from_dict({"optimizer": {"ranks": 4}})
    assert "optimizer.ranks" in str(e.value) and "did you mean 'rank'?" in str(e.value)
    with pytest.raises(ValueError, match="did you mean 'sharding'"):
        Config.from_dict({"shardng": {"stage": 2}})


def test_activation_budget_checked_eagerly() -> None:
    assert Config.from_dict({}, ["activations.budget=6GiB"]).activations.budget == "6GiB"
    with pytest.raises(ValueError, match="activations.budget"):
        Config.from_dict({}, ["activations.budget=lots"])


def test_model_override_typo_is_caught() -> None:
    from memopt.config.workload import llama_config

    cfg = Config.from_dict({}, ["model.overrides.hiden_size=96"])  # LlamaConfig would ignore it
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        llama_config(cfg)
    assert llama_config(cfg.replace(["model.overrides={hidden_size: 96}"])).hidden_size == 96


def test_python_construction_is_validated() -> None:
    assert OptimizerConfig(lr="2e-3").lr == 2e-3  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer.name"):
        OptimizerConfig(name="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offload_params"):
        ShardingConfig(stage=2, offload_params="cpu")
    with pytest.raises(ValueError, match="nvme_path' is required with offload_params"):
        ShardingConfig(stage=3, offload_params="nvme")
    with pytest.raises(ValueError, match="hybrid_update"):
        ShardingConfig(stage=3, offload="cpu", hybrid_update=True)
    with pytest.raises(ValueError, match="in_backward"):
        Config(optimizer=OptimizerConfig(in_backward=True), sharding=ShardingConfig(stage=2))
    with pytest.raises(ValueError, match="one of budget, policy, policies"):
        Config.from_dict({"activations": {"budget": "50%", "policy": "recompute"}})


def test_from_deepspeed(tmp_path: Path) -> None:
    ds = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.95],
                                                  "eps": 1e-8, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000,
                              "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}},
    }  # fmt: skip
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = Config.from_deepspeed(path)
    assert cfg.sharding.stage == 2 and cfg.sharding.offload == "nvme"
    assert cfg.sharding.nvme_path == "/x"
    assert cfg.sharding.bucket_bytes == 1000 * 2  # elements x bf16 bytes
    assert cfg.sharding.master_dtype == "fp32" and cfg.model.dtype == "bf16"
    o = cfg.optimizer
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay) == ("adamw", 2e-4, (0.9, 0.95), 1e-8, 0.1)
    assert o.warmup_steps == 10 and o.max_grad_norm == 0.5
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (3, 2)
    z3 = Config.from_deepspeed(
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    )
    assert z3.sharding.stage == 3 and z3.sharding.offload_params == "cpu"
    z3n = Config.from_deepspeed({"zero_optimization": {
        "stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nv"},
        "offload_optimizer": {"device": "nvme", "nvme_path": "/nv"}}})  # fmt: skip
    sh = z3n.sharding
    assert (sh.offload_params, sh.offload, sh.nvme_path) == ("nvme", "nvme", "/nv")
    built = build.shard_config(sh)
    assert built is not None and built.param_nvme is not None
    assert str(built.param_nvme.directory) == "/nv" and built.offload is not None
    with pytest.raises(ValueError, match="different nvme_path"):
        Config.from_deepspeed({"zero_optimization": {
            "stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/a"},
            "offload_optimizer": {"device": "nvme", "nvme_path": "/b"}}})  # fmt: skip
    assert Config.from_deepspeed({"zero_optimization": {"stage": 0}}).sharding.stage == 0
    with pytest.raises(ValueError, match="Adam/AdamW"):
        Config.from_deepspeed({"optimizer": {"type": "OneBitLamb"}})
    with pytest.raises(ValueError, match="loss scaler"):
        Config.from_deepspeed({"fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="DeepSpeed config: unknown zero_optimization key"):
        Config.from_deepspeed({"zero_optimization": {"stage": 2, "warp_speed": True}})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Config.from_deepspeed({"zero_optimization": {"stage": 1}, "wall_clock_breakdown": False})
    assert any("wall_clock_breakdown" in str(x.message) for x in w)


def _from_ds(ds: dict) -> tuple[Config, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = Config.from_deepspeed(ds)
    return cfg, [str(x.message) for x in w]


def test_from_deepspeed_schedulers_map_or_warn() -> None:
    # WarmupLR: constant after warm-up, peak warmup_max_lr; the log warm-up (DeepSpeed's
    # default) and a non-zero start are warned about, not dropped silently
    cfg, msgs = _from_ds({"scheduler": {"type": "WarmupLR", "params": {
        "warmup_num_steps": 5, "warmup_max_lr": 3e-4, "warmup_min_lr": 1e-5}}})  # fmt: skip
    o = cfg.optimizer
    assert (o.schedule, o.warmup_steps, o.lr) == ("constant", 5, 3e-4)
    assert any("warmup_type 'log'" in m for m in msgs) and any("1e-05" in m for m in msgs)
    # WarmupDecayLR: cosine to 0 over total_num_steps (warned: not linear)
    cfg, msgs = _from_ds({"scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_num_steps": 2, "total_num_steps": 40, "warmup_max_lr": 1e-3,
        "warmup_type": "linear"}}})  # fmt: skip
    o = cfg.optimizer
    assert (o.schedule, o.min_lr_ratio, o.lr, cfg.train.steps) == ("cosine", 0.0, 1e-3, 40)
    assert len(msgs) == 1 and "linear decay" in msgs[0]
    # WarmupCosineLR: cos_min_ratio and total_num_steps map; with a linear warm-up (its
    # default is log, like the others: tests/config/test_deepspeed_defaults.py) no warning
    cfg, msgs = _from_ds({"scheduler": {"type": "WarmupCosineLR", "params": {
        "warmup_num_steps": 2, "total_num_steps": 30, "cos_min_ratio": 0.05,
        "warmup_type": "linear"}}})  # fmt: skip
    assert (cfg.optimizer.min_lr_ratio, cfg.train.steps) == (0.05, 30) and not msgs
    # train_batch_size is not carried over: said
    _, msgs = _from_ds({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4})
    assert len(msgs) == 1 and "train_batch_size 64" in msgs[0]
    _, msgs = _from_ds({"train_batch_size": "auto"})
    assert not msgs


def test_docs_config_md_is_current() -> None:
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference_markdown(), (
        "docs/config.md is stale: run python scripts/gen_config_docs.py"
    )


def test_reference_names_every_key() -> None:
    text = reference_markdown()
    for section, values in Config().to_dict().items():
        for key in values:
            assert f"`{section}.{key}`" in text


def test_a_section_that_is_not_a_mapping_and_string_overrides_are_refused() -> None:
    """`optimizer: []` was taken as all defaults, and a string of overrides was split into
    characters ("override 'o' is not key=value")."""
    with pytest.raises(ValueError, match="section 'optimizer' must be a mapping"):
        Config.from_dict({"optimizer": []})
    with pytest.raises(TypeError, match=r"pass \['optimizer.lr=1e-3'\]"):
        Config.from_dict({}, "optimizer.lr=1e-3")  # type: ignore[arg-type]
    assert Config.from_dict({"optimizer": None}) == Config.from_dict({})
