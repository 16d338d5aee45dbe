"""``memopt run``: the torchrun command it builds, its early failure on a bad override, one
end-to-end launch of a tiny recipe (log lines, snapshots) and a resumed run that says so; and
every shipped recipe parses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt import Config
from memopt.cli import launch
from memopt.cli import main as cli_main
from memopt.cli.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]

TINY = """
model: {preset: llama-tiny, device: cpu, overrides: {hidden_size: 32, intermediate_size: 64}}
data: {source: stdlib, max_bytes: 20000}
train: {steps: 3, batch_size: 2, seq_len: 16, log_every: 1}
optimizer: {name: galore, rank: 4, update_proj_gap: 2}
sharding: {stage: 2}
checkpoint: {directory: ckpt, every_n_steps: 2, fsync: false}
"""


def test_torchrun_command_single_and_multi_node() -> None:
    args = launch.parser().parse_intermixed_args(["r.yaml", "train.steps=5", "--nproc-per-node",
                                                  "2", "optimizer.lr=1e-3"])  # fmt: skip
    cmd = launch.torchrun_command(args, "r.yaml")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-5:] == ["-m", "memopt.cli.train", "r.yaml", "train.steps=5", "optimizer.lr=1e-3"]
    args = launch.parser().parse_intermixed_args(
        ["r.yaml", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
         "--master-port", "29501"])  # fmt: skip
    cmd = launch.torchrun_command(args, "r.yaml")
    assert "--standalone" not in cmd
    joined = " ".join(cmd)
    assert "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29501" in joined
    # one node with a fixed port: the port is kept (standalone would pick its own)
    args = launch.parser().parse_intermixed_args(["r.yaml", "--master-port", "29533"])
    cmd = launch.torchrun_command(args, "r.yaml")
    assert "--standalone" not in cmd
    assert "--nnodes 1 --node-rank 0 --master-port 29533" in " ".join(cmd)
    args = launch.parser().parse_intermixed_args(["r.yaml", "--node-rank", "1"])
    with pytest.raises(SystemExit, match="--node-rank 1 needs --nnodes > 1"):
        launch.torchrun_command(args, "r.yaml")


def test_bad_override_fails_before_launch(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    with pytest.raises(SystemExit, match="optimizer.lrr"):
        cli_main(["run", str(recipe), "optimizer.lrr=1"])
    with pytest.raises(SystemExit, match="no recipe"):
        cli_main(["run", str(tmp_path / "missing.yaml")])
    # one level down, and values only the model config checks: still before any process
    with pytest.raises(SystemExit, match=r"LlamaConfig has no \['hidden_szie'\]"):
        cli_main(["run", str(recipe), "model.overrides.hidden_szie=32"])
    with pytest.raises(SystemExit, match="model.overrides: .*multiple of the number of attention"):
        cli_main(["run", str(recipe), "model.overrides.num_attention_heads=5"])
    with pytest.raises(SystemExit, match="'optimizer.proj' must be one of"):
        cli_main(["run", str(recipe), "optimizer.proj=SVD"])
    assert cli_main(["run", str(recipe), "--dry-run"]) == 0


def test_bare_recipe_name_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert launch.resolve_recipe("galore_llama") == "recipes/galore_llama.yaml"
    assert launch.resolve_recipe("recipes/frugal_llama.yaml") == "recipes/frugal_llama.yaml"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_parse(name: str) -> None:
    cfg = Config.from_yaml(ROOT / "recipes" / name)
    assert cfg.train.steps >= 20 and cfg.checkpoint.directory


def test_memopt_run_end_to_end_and_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "memopt.cli", "run", str(recipe), "--nproc-per-node", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "torch.distributed.run" in out and "ZeRO-2 over 1 rank(s)" in out
    for step in (1, 2, 3):
        line = next(x for x in out.splitlines() if x.startswith(f"step {step}/3 loss "))
        assert "tok/s" in line and "rss " in line and "pinned " in line and "nvme " in line
    assert "snapshot: step 2 started (async) -> ckpt" in out
    assert "snapshot: step 3 started (async) -> ckpt" in out
    assert "snapshot: step(s) [2, 3] published in" in out or (
        "snapshot: step(s) [2] published in" in out and "snapshot: step(s) [3] published in" in out
    )  # (a save's own line says it started; the publication is reported when it is seen)
    assert "done: steps 0->3" in out and "RESUMED" not in out
    assert "train:" in proc.stderr  # the progress bar
    # a second run of the same recipe, two steps longer, continues from the step-3 snapshot
    monkeypatch.chdir(tmp_path)
    assert train_main([str(recipe), "train.steps=5"]) == 0
    again = capsys.readouterr().out
    assert "RESUMED: resumed from snapshot step 3" in again
    assert "step 3/5" not in again and "step 4/5 loss" in again and "done: steps 3->5" in again
    # and once more at the same length: nothing to train (it printed "final loss nan")
    assert train_main([str(recipe), "train.steps=5"]) == 0
    done = capsys.readouterr().out
    assert "done: nothing to train, the run is already at step 5" in done and "nan" not in done


def test_init_from_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    from memopt.config.workload import load_weights

    missing = tmp_path / "chekpoints"
    with pytest.raises(ValueError, match="is not a directory of snapshots"):
        load_weights(torch.nn.Linear(2, 2), str(missing))
    assert not missing.exists()
