"""``memopt.cli.train`` on one rank under torchrun's environment (what ``memopt run`` starts by
default): it joins a one-rank process group, so ZeRO-3 parameter offload (FSDP2's) runs; and
the log line's LR is the one each step ran at."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.distributed as dist

from memopt.cli.train import main as train_main

TINY = """
model: {preset: llama-tiny, device: cpu, overrides: {hidden_size: 32, intermediate_size: 64,
        num_hidden_layers: 1}}
data: {source: stdlib, max_bytes: 20000}
train: {steps: 2, batch_size: 1, seq_len: 16, log_every: 1}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_rank_under_torchrun_env_runs_zero3_param_offload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # what torchrun --standalone --nproc-per-node 1 sets (conftest restores the environment
    # and destroys the group)
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    recipe = tmp_path / "z3.yaml"
    recipe.write_text(TINY + "sharding: {stage: 3, offload_params: cpu}\n")
    # before: "offload_params='cpu' runs FSDP2, which needs torch.distributed initialized"
    assert train_main([str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "memopt run: 1 rank(s)" in out and "done: steps 0->2" in out
    assert not dist.is_initialized()  # left together at the end


def test_log_line_shows_the_lr_the_step_ran_at(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "warm.yaml"
    recipe.write_text(TINY)
    # warm-up: step k (from 0) runs at lr * (k + 1) / (warmup_steps + 1) = 1e-3 * (k + 1) / 5
    assert train_main([str(recipe), "train.steps=3", "optimizer.lr=1e-3",
                       "optimizer.warmup_steps=4", "optimizer.schedule=constant"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert [x.split(" lr ")[1].split()[0] for x in lines] == ["2.00e-04", "4.00e-04", "6.00e-04"]


def test_a_snapshot_the_resume_cannot_use_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When every snapshot is damaged, or the snapshot was saved by another optimizer, the run
    stops with one line naming the error (a traceback per rank before)."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "ck.yaml"
    recipe.write_text(TINY + "checkpoint: {directory: ck, every_n_steps: 1, fsync: false}\n")
    assert train_main([str(recipe)]) == 0  # snapshots of steps 1 and 2
    out = capsys.readouterr().out
    assert "snapshot: step 2 started (async)" in out and "published in" in out
    with pytest.raises(SystemExit, match=r"^memopt run: SnapshotMismatchError: .*saved by AdamW"):
        train_main([str(recipe), "train.steps=3", "optimizer.name=galore", "optimizer.rank=4"])
    for step in (2, 1):  # (one damaged snapshot is skipped: tests/config/test_setup.py)
        data = next((tmp_path / "ck" / f"step_{step:010d}").glob("rank_*.safetensors"))
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
    with pytest.warns(UserWarning), pytest.raises(
        SystemExit, match=r"^memopt run: CorruptSnapshotError: .*every snapshot .* is damaged"
    ):
        train_main([str(recipe), "train.steps=3"])
