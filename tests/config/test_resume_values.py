"""What a resume takes from the Config and what from the snapshot (sweep22 finding 2), and a
fresh run into a directory that already holds snapshots (finding 8)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import memopt
from memopt import Config
from memopt.config.build import lr_lambda
from memopt.config.workload import batches, build_model


def _cfg(directory: Path, *overrides: str) -> Config:
    return Config.from_dict({}, [
        "model.preset=llama-tiny", "model.device=cpu", "data.max_bytes=20000",
        "train.steps=10", "train.batch_size=2", "train.seq_len=16",
        f"checkpoint.directory={directory}", "checkpoint.fsync=false", *overrides,
    ])  # fmt: skip


def _run(cfg: Config, steps: int) -> memopt.Setup:
    """Train ``steps`` steps from wherever ``memopt.setup`` starts, snapshot, close."""
    s = memopt.setup(build_model(cfg), cfg)
    data = batches(cfg, 0, s.start_step)
    for _ in range(steps):
        x = next(data)
        s.model(input_ids=x, labels=x).loss.backward()
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
    s.save(s.start_step + steps)
    s.close()
    return s


def test_a_resume_runs_the_configs_lr_betas_eps_and_weight_decay(tmp_path: Path) -> None:
    first = ["optimizer.lr=3e-3", "optimizer.weight_decay=0.01", "optimizer.warmup_steps=4"]
    _run(_cfg(tmp_path, *first), 2)
    cfg = _cfg(tmp_path, "optimizer.lr=1e-5", "optimizer.weight_decay=0.5",
               "optimizer.betas=[0.5,0.6]", "optimizer.eps=1e-3", "optimizer.warmup_steps=4")
    s = memopt.setup(build_model(cfg), cfg)
    assert s.resumed_from == 2
    matrices, vectors = s.optimizer.param_groups  # AdamW: decayed matrices, undecayed 1-D
    assert matrices["weight_decay"] == 0.5 and vectors["weight_decay"] == 0.0
    for g in (matrices, vectors):
        assert g["betas"] == (0.5, 0.6) and g["eps"] == 1e-3 and g["initial_lr"] == 1e-5
        assert g["lr"] == 1e-5 * lr_lambda(cfg.optimizer, 10)(2)  # the Config's schedule
    assert s.scheduler.base_lrs == [1e-5, 1e-5]
    assert ("the Config's optimizer values replace the snapshot's: lr 0.003 -> 1e-05, betas "
            "(0.9, 0.999) -> (0.5, 0.6), eps 1e-08 -> 0.001, weight_decay 0.01 -> 0.5"
            in s.resume_message)
    assert "lr 1e-05 betas (0.5, 0.6) wd 0.5" in s.describe()
    s.scheduler.step()  # the next step's LR follows the new peak too
    assert matrices["lr"] == pytest.approx(1e-5 * lr_lambda(cfg.optimizer, 10)(3))
    s.close()


def test_an_unchanged_resume_keeps_the_snapshots_lr_to_the_bit(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "optimizer.name=galore", "optimizer.rank=4", "optimizer.warmup_steps=3")
    s = memopt.setup(build_model(cfg), cfg)
    data = batches(cfg)
    for _ in range(2):
        x = next(data)
        s.model(input_ids=x, labels=x).loss.backward()
        s.optimizer.step()
        s.scheduler.step()
    saved = [g["lr"] for g in s.optimizer.param_groups]
    s.save(2)
    s.close()
    again = memopt.setup(build_model(cfg), cfg)
    assert [g["lr"] for g in again.optimizer.param_groups] == saved
    assert again.resume_message.endswith("continuing at step 3")  # nothing to report
    again.close()


def test_a_longer_run_resumes_on_the_new_schedule_from_its_first_step(tmp_path: Path) -> None:
    _run(_cfg(tmp_path, "train.steps=2"), 2)  # ends at the cosine floor, lr * 0.1
    cfg = _cfg(tmp_path, "train.steps=10")
    s = memopt.setup(build_model(cfg), cfg)
    assert s.optimizer.param_groups[0]["lr"] == 1e-3 * lr_lambda(cfg.optimizer, 10)(2)
    assert s.optimizer.param_groups[0]["lr"] > 1e-4 * 1.5
    s.close()


def test_what_shapes_the_saved_state_stays_the_snapshots_and_is_reported(tmp_path: Path) -> None:
    _run(_cfg(tmp_path, "optimizer.name=galore", "optimizer.rank=4"), 1)
    cfg = _cfg(tmp_path, "optimizer.name=galore", "optimizer.rank=8",
               "optimizer.update_proj_gap=5", "optimizer.scale=0.5")
    s = memopt.setup(build_model(cfg), cfg)
    low = s.optimizer.param_groups[0]
    assert low["rank"] == 4 and low["update_proj_gap"] == 5 and low["scale"] == 0.5
    assert "scale 0.25 -> 0.5, update_proj_gap 200 -> 5" in s.resume_message
    assert "kept from the snapshot" in s.resume_message and "rank 4 (Config: 8)" in s.resume_message
    assert "rank 4 on 'attn|mlp'" in s.describe()  # what runs, not the Config's 8
    s.close()


def test_resume_off_into_a_directory_with_snapshots_says_so_before_step_one(
        tmp_path: Path) -> None:
    _run(_cfg(tmp_path / "old"), 3)
    cfg = _cfg(tmp_path / "old", "checkpoint.resume=false")
    with pytest.warns(UserWarning, match="already holds snapshots up to step 3"):
        s = memopt.setup(build_model(cfg), cfg)
    assert s.resumed_from is None and s.start_step == 0
    line = next(t for t in s.describe().splitlines() if t.startswith("resume"))
    assert "checkpoint.resume=false" in line and "fresh checkpoint.directory" in line
    s.close()
    fresh = _cfg(tmp_path / "new", "checkpoint.resume=false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty directory: nothing to say
        s = memopt.setup(build_model(fresh), fresh)
    assert s.resume_message == "" and "resume " not in s.describe()
    s.close()
