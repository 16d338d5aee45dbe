"""``memopt estimate --recipe``: the recipe sets the workload, so a workload flag (which it
would ignore) is refused, naming the override that applies; ``--world-size`` still applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memopt.cli import RECIPE_KEYS, main, parser

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "zero2_cpu_offload.yaml"


def test_workload_flags_refused_with_the_matching_override() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["estimate", "--recipe", str(RECIPE), "--world-size", "2", "--stage", "3",
              "--optimizer", "galore", "--batch-size", "64", "--offload", "nvme",
              "--param-dtype", "bfloat16"])  # fmt: skip
    err = str(exc.value.code)
    assert err.startswith("memopt estimate: --batch-size 64 --optimizer galore --stage 3 "
                          "--param-dtype bfloat16 --offload nvme: ")  # fmt: skip
    assert err.endswith("train.batch_size=64 optimizer.name=galore sharding.stage=3 "
                        "model.dtype=bf16 sharding.offload=nvme")  # fmt: skip


def test_every_workload_flag_is_covered() -> None:
    """A workload flag added later must get its recipe key, or --recipe would ignore it."""
    args = vars(parser().parse_args(["estimate"]))
    kept = {"command", "recipe", "overrides", "world_size", "json"}
    assert set(args) - kept == set(RECIPE_KEYS)
    assert all(args[dest] is None for dest in RECIPE_KEYS)  # (so "given" is "not None")


def test_world_size_and_overrides_still_apply(tmp_path: Path) -> None:
    out = [tmp_path / "a.json", tmp_path / "b.json"]
    assert main(["estimate", "--recipe", str(RECIPE), "--world-size", "2", "--json",
                 str(out[0])]) == 0  # fmt: skip
    assert main(["estimate", "--recipe", str(RECIPE), "--world-size", "2", "--json",
                 str(out[1]), "sharding.stage=3"]) == 0  # fmt: skip
    a, b = (json.loads(p.read_text()) for p in out)
    assert a["world_size"] == b["world_size"] == 2
    assert (a["config"]["stage"], b["config"]["stage"]) == (2, 3)


def test_defaults_unchanged_without_a_recipe(tmp_path: Path) -> None:
    """(--optimizer and --stage lost their argparse defaults: the Workload's apply.)"""
    tiny = ["--hidden", "64", "--layers", "2", "--vocab", "500", "--seq-len", "16"]
    assert main(["estimate", *tiny, "--json", str(tmp_path / "e.json")]) == 0
    cfg = json.loads((tmp_path / "e.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["stage"]) == ("adamw", 0), cfg
