"""``memopt run`` refuses, before starting any rank, what it can know from the world size and
the filesystem (``memopt.config.preflight``, which the ranks run too), in one line naming the
key; YAML errors name the file once; a DeepSpeed JSON gets a hint to convert it."""

from __future__ import annotations

from pathlib import Path

import pytest

from memopt import Config
from memopt.cli import main as cli_main
from memopt.cli.train import main as train_main
from memopt.config.preflight import check_paths, check_world

TINY = """
model: {preset: llama-tiny, device: cpu, overrides: {hidden_size: 32, intermediate_size: 64,
        num_hidden_layers: 1}}
data: {source: stdlib, max_bytes: 20000}
train: {steps: 1, batch_size: 1, seq_len: 16}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(TINY)
    return path


def _run_error(*argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", *argv])
    return str(exc.value.code)


@pytest.mark.parametrize(("args", "needle", "fits"), [
    (["checkpoint.redundancy=replicate"], "checkpoint.redundancy: replicate needs 2+ ranks",
     ["--nproc-per-node", "2"]),
    (["checkpoint.redundancy=erasure", "checkpoint.erasure_k=2", "--nproc-per-node", "2"],
     "checkpoint.erasure_k/erasure_m: erasure coding with k=2, m=1 needs a group of k + m = 3",
     ["--nproc-per-node", "3"]),
    (["checkpoint.redundancy=replicate", "checkpoint.copies=2", "--nproc-per-node", "2"],
     "checkpoint.copies: copies=2 needs at least 3 ranks", ["--nproc-per-node", "3"]),
    (["optimizer.in_backward=true", "--nnodes", "2", "--node-rank", "0"],
     "optimizer.in_backward: each rank would update", ["--nnodes", "1"]),
])  # fmt: skip
def test_world_size_errors_before_launch(recipe: Path, args: list[str], needle: str,
                                         fits: list[str]) -> None:
    ck = f"checkpoint.directory={recipe.parent / 'ck'}"
    err = _run_error(str(recipe), ck, "--dry-run", *args)
    assert err.startswith(f"memopt run: {recipe}: {needle}") and "\n" not in err, err
    # the same recipe on a world it fits passes (the later option wins)
    assert cli_main(["run", str(recipe), ck, "--dry-run", *args, *fits]) == 0


def test_elastic_node_range_leaves_the_world_check_to_the_ranks(recipe: Path) -> None:
    assert cli_main(["run", str(recipe), "optimizer.in_backward=true", "--nnodes", "1:2",
                     "--dry-run"]) == 0  # fmt: skip


def test_unusable_directories_named_by_key(recipe: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _run_error(str(recipe), f"checkpoint.directory={blocker}")
    assert f"checkpoint.directory: the checkpoint directory {blocker} is an existing file" in err
    err = _run_error(str(recipe), f"checkpoint.directory={blocker}/sub")
    assert f"checkpoint.directory: cannot create the checkpoint directory {blocker}/sub" in err
    for key, extra in [("sharding.nvme_path", "sharding.offload=nvme"),
                       ("activations.nvme_path", "activations.policy=swap")]:
        tier = ["activations.tier=nvme"] if key.startswith("activations") else []
        err = _run_error(str(recipe), extra, *tier, f"{key}={blocker}/sub")
        assert f"{key}: cannot create the NVMe swap directory {blocker}/sub (" in err, err
        err = _run_error(str(recipe), extra, *tier, f"{key}={blocker}")
        assert f"{key}: {blocker} is an existing file, not a directory" in err, err
    # --dry-run creates nothing; a real launch's check creates what the ranks would
    fresh = tmp_path / "new" / "ck"
    assert cli_main(["run", str(recipe), f"checkpoint.directory={fresh}", "--dry-run"]) == 0
    assert not fresh.parent.exists()
    check_paths(Config.from_dict({}, [f"checkpoint.directory={fresh}", "sharding.offload=nvme",
                                      f"sharding.nvme_path={tmp_path / 'nv'}"]))  # fmt: skip
    assert fresh.is_dir() and (tmp_path / "nv").is_dir()


def test_the_ranks_run_the_same_checks(recipe: Path, tmp_path: Path) -> None:
    """A rank started by hand (no launcher) names the key too, not a raw pathlib error."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="sharding.nvme_path: .* is an existing file"):
        train_main([str(recipe), "sharding.offload=nvme", f"sharding.nvme_path={blocker}"])
    with pytest.raises(ValueError, match="checkpoint.redundancy: replicate needs 2\\+ ranks"):
        check_world(Config.from_dict({}, ["checkpoint.directory=x",
                                          "checkpoint.redundancy=replicate"]), 1)
    with pytest.raises(ValueError, match=r"checkpoint.erasure_k/erasure_m on 2 ranks: "):
        check_world(Config.from_dict({}, ["checkpoint.directory=x", "checkpoint.erasure_m=2",
                                          "checkpoint.redundancy=erasure"]), 2)  # fmt: skip


def test_yaml_error_names_the_file_once(tmp_path: Path) -> None:
    bad = tmp_path / "tab.yaml"
    bad.write_text("train:\n\tsteps: 2\n")
    err = _run_error(str(bad), "--dry-run")
    assert err.startswith(f"memopt run: {bad}: not valid YAML") and err.count(str(bad)) == 2, err
    # (the second: PyYAML's 'in "<file>", line 2'); an override error still names it once
    good = tmp_path / "ok.yaml"
    good.write_text(TINY)
    assert _run_error(str(good), "optimizer.lrr=1").startswith(f"memopt run: {good}: ")


def test_deepspeed_json_gets_a_conversion_hint(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}, '
                  '"train_micro_batch_size_per_gpu": 4}')
    err = _run_error(str(ds), "--dry-run")
    assert "this looks like a DeepSpeed config" in err
    assert f"Config.from_deepspeed({str(ds)!r}).to_yaml(" in err
    same = tmp_path / "ds.yaml"  # by its keys, whatever the file is called
    same.write_text("zero_optimization: {stage: 2}\n")
    assert "Config.from_deepspeed" in _run_error(str(same), "--dry-run")
