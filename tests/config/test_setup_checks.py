"""memopt.setup's checks before it builds anything (memopt.config.preflight, the rules memopt
run's launcher applies too), and the stage a sharding section runs as, as describe() and the
estimator report it (sweep22 finding 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memopt
from memopt import Config
from memopt.config.build import effective_stage, shard_config
from memopt.config.estimate import estimate, estimate_kwargs
from memopt.config.workload import build_model
from memopt.sharding import ShardedOptimizer

SMALL = ["model.preset=llama-tiny", "model.device=cpu", "data.max_bytes=20000"]


def test_stage0_with_a_master_dtype_is_described_and_estimated_as_the_zero1_it_runs() -> None:
    cfg = Config.from_dict({}, [*SMALL, "model.dtype=bf16", "sharding.master_dtype=fp32"])
    assert cfg.sharding.stage == 0 and effective_stage(cfg.sharding) == 1
    built = shard_config(cfg.sharding)
    assert built is not None and built.stage == 1 and built.master_dtype == torch.float32
    s = memopt.setup(build_model(cfg), cfg)
    assert isinstance(s.optimizer, ShardedOptimizer) and s.optimizer.config.stage == 1
    line = next(t for t in s.describe().splitlines() if t.startswith("sharding"))
    assert "ZeRO-1 over 1 rank(s)" in line and "stage 0 with a master dtype runs as stage 1" in line
    assert "fp32 master weights" in line
    s.close()
    as_stage1 = cfg.replace(["sharding.stage=1"])
    assert estimate_kwargs(cfg, 2) == estimate_kwargs(as_stage1, 2)
    assert estimate(cfg, 2).to_dict() == estimate(as_stage1, 2).to_dict()


@pytest.mark.parametrize(
    ("overrides", "stage"),
    [([], 0), (["sharding.offload=cpu"], 1), (["sharding.master_dtype=bf16"], 1),
     (["sharding.stage=2", "sharding.master_dtype=fp32"], 2), (["sharding.stage=3"], 3)],
)
def test_one_stage_rule_for_build_and_estimate(overrides: list[str], stage: int) -> None:
    cfg = Config.from_dict({}, overrides)
    built = shard_config(cfg.sharding)
    assert (0 if built is None else built.stage) == effective_stage(cfg.sharding) == stage
    assert estimate_kwargs(cfg)["stage"] == stage


def test_setup_names_the_key_of_a_path_it_cannot_create(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    cfg = Config.from_dict({}, [*SMALL, "sharding.offload=nvme",
                                f"sharding.nvme_path={afile}/nv"])
    with pytest.raises(ValueError, match="sharding.nvme_path: cannot create the NVMe swap"):
        memopt.setup(build_model(cfg), cfg)
    cfg = Config.from_dict({}, [*SMALL, f"checkpoint.directory={afile}"])
    with pytest.raises(ValueError, match="checkpoint.directory: the checkpoint directory"):
        memopt.setup(build_model(cfg), cfg)


def test_setup_applies_the_world_rules_before_building(tmp_path: Path) -> None:
    cfg = Config.from_dict({}, [*SMALL, "checkpoint.redundancy=replicate",
                                f"checkpoint.directory={tmp_path / 'ck'}"])
    with pytest.raises(ValueError, match="checkpoint.redundancy: replicate needs 2\\+ ranks"):
        memopt.setup(build_model(cfg), cfg)
    assert not (tmp_path / "ck").exists()  # (check_world, then check_paths)


@pytest.mark.parametrize(
    ("name", "rank"),
    [("apollo", 128), ("galore", 128), ("natural_galore", 128), ("apollo_mini", 1)],
)
def test_estimate_sizes_a_null_rank_as_setup_builds_it(name: str, rank: int) -> None:
    # optimizer.rank: null is build.default_rank for memopt.setup / memopt run; the estimate
    # used the estimator's own default (256 for APOLLO: twice the state it trains with)
    cfg = Config.from_dict({}, [*SMALL, f"optimizer.name={name}"])
    assert cfg.optimizer.rank is None
    assert estimate_kwargs(cfg)["optimizer_kwargs"]["rank"] == rank
    s = memopt.setup(build_model(cfg), cfg)
    ranks = {g["rank"] for g in s.optimizer.param_groups if "rank" in g}
    s.close()
    assert ranks == {rank}
    explicit = cfg.replace([f"optimizer.rank={rank}"])
    assert estimate(cfg).to_dict() == estimate(explicit).to_dict()
