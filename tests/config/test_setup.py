"""memopt.setup on a tiny LLaMA: GaLore + ZeRO-2 on one rank matches plain GaLore, activation
policies and the planner are installed, the LR schedule, and the checkpointer's resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memopt
from memopt import Config
from memopt.checkpoint import CorruptSnapshotError
from memopt.checkpoint.publish import step_name
from memopt.config.build import lr_lambda
from memopt.config.workload import batches, build_model
from memopt.sharding import ShardedOptimizer

BASE = {
    "model": {"preset": "llama-tiny", "device": "cpu"},
    "train": {"steps": 10, "batch_size": 2, "seq_len": 16},
    "data": {"max_bytes": 20000},
}


def _cfg(**sections: dict) -> Config:
    data = {k: dict(v) for k, v in BASE.items()}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return Config.from_dict(data)


def _train(s: memopt.Setup, cfg: Config, steps: int) -> list[float]:
    data = batches(cfg)
    losses = []
    for _ in range(steps):
        x = next(data)
        loss = s.model(input_ids=x, labels=x).loss
        loss.backward()
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_galore_stage2_one_rank_matches_plain_galore() -> None:
    opt = {"name": "galore", "rank": 4, "update_proj_gap": 2, "lr": 1e-2}
    plain_cfg = _cfg(optimizer=opt)
    sharded_cfg = _cfg(optimizer=opt, sharding={"stage": 2})
    plain = memopt.setup(build_model(plain_cfg), plain_cfg)
    sharded = memopt.setup(build_model(sharded_cfg), sharded_cfg)
    assert isinstance(sharded.optimizer, ShardedOptimizer)
    assert type(sharded.optimizer.inner).__name__ == "GaLoreAdamW"
    assert any(g.get("rank") == 4 for g in sharded.optimizer.param_groups)
    a, b = _train(plain, plain_cfg, 4), _train(sharded, sharded_cfg, 4)
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert a[-1] < a[0]
    for p, q in zip(plain.model.parameters(), sharded.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert "ZeRO-2" in sharded.describe() and "rank 4" in sharded.describe()


def test_optimizer_options_reach_the_optimizer() -> None:
    cfg = _cfg(optimizer={"name": "apollo_mini", "lr": 2e-3, "betas": [0.8, 0.9], "eps": 1e-7,
                          "weight_decay": 0.05, "state_dtype": "int8"})  # fmt: skip
    s = memopt.setup(build_model(cfg), cfg)
    assert type(s.optimizer).__name__ == "ApolloMini"
    for g in s.optimizer.param_groups:
        assert g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7 and g["state_dtype"] == "int8"
    low = [g for g in s.optimizer.param_groups if g.get("rank") is not None]
    assert low and all(g["rank"] == 1 and g["scale"] == 128.0 for g in low)


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = _cfg(optimizer={"warmup_steps": 4, "min_lr_ratio": 0.1})
    f = lr_lambda(cfg.optimizer, 14)
    assert [round(f(i), 4) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1)
    assert f(9) == pytest.approx(0.55)
    s = memopt.setup(build_model(cfg), cfg)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.2)


def test_activation_policy_recompute_keeps_gradients() -> None:
    cfg = _cfg(activations={"policy": "recompute"})
    ref_model = build_model(cfg)
    s = memopt.setup(build_model(cfg), cfg)
    assert s.activations is not None and len(s.activations.policies) == 2
    x = next(batches(cfg))
    s.model(input_ids=x, labels=x).loss.backward()
    ref_model(input_ids=x, labels=x).loss.backward()
    for p, q in zip(ref_model.parameters(), s.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert "recompute on 2 block(s)" in s.describe()
    s.close()


def test_activation_planner_needs_a_batch_and_plans() -> None:
    cfg = _cfg(activations={"budget": "60%", "actions": ["keep", "recompute"]})
    with pytest.raises(ValueError, match="sample_batch"):
        memopt.setup(build_model(cfg), cfg)
    x = next(batches(cfg))
    s = memopt.setup(build_model(cfg), cfg, sample_batch={"input_ids": x, "labels": x})
    assert s.plan is not None and s.plan.predicted_peak_bytes <= s.plan.budget_bytes
    assert any(d.policy.action == "recompute" for d in s.plan.decisions)
    assert all(p.grad is None for p in s.model.parameters())  # the profile step left nothing
    assert "planner, budget 60%" in s.describe()
    loss = _train(s, cfg, 1)[0]
    assert loss == loss  # finite: the planned model trains
    s.close()


def test_checkpoint_and_resume(tmp_path: Path) -> None:
    ck = {"directory": str(tmp_path / "ck"), "fsync": False}
    cfg = _cfg(optimizer={"name": "galore", "rank": 4}, checkpoint=ck)
    s = memopt.setup(build_model(cfg), cfg)
    assert s.resumed_from is None and s.resume_message == ""
    _train(s, cfg, 3)
    s.save(3)
    s.checkpointer.wait()
    saved = {k: v.clone() for k, v in s.model.state_dict().items()}
    lr = s.optimizer.param_groups[0]["lr"]
    s.close()
    again = memopt.setup(build_model(cfg), cfg)  # fresh init, then the snapshot
    assert again.resumed_from == 3 and again.start_step == 3
    assert "resumed from snapshot step 3" in again.resume_message
    assert "continuing at step 4" in again.describe()
    for k, v in again.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    again.close()
    fresh = memopt.setup(build_model(cfg), cfg, resume=False)
    assert fresh.resumed_from is None
    fresh.close()


def test_setup_errors() -> None:
    cfg = _cfg(checkpoint={"redundancy": "replicate"})
    with pytest.raises(ValueError, match="2\\+ ranks"):
        memopt.setup(build_model(cfg), cfg)
    with pytest.raises(TypeError, match="memopt.Config"):
        memopt.setup(build_model(cfg), {"optimizer": {}})  # type: ignore[arg-type]


def test_launched_as_many_ranks_without_a_process_group_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Under torchrun (WORLD_SIZE > 1) with no process group, every rank trained alone and
    wrote the same checkpoint files; memopt.setup now says to initialize the group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        memopt.setup(model, memopt.Config.from_dict({"optimizer": {"name": "adamw"}}))


def test_process_group_must_be_a_group_of_an_initialized_torch_distributed() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        memopt.setup(model, Config(), process_group="gloo")


def _flip_a_byte(step_dir: Path) -> None:
    data = next(step_dir.glob("rank_*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # (the last tensor's bytes: its checksum fails, the header still parses)
    data.write_bytes(bytes(raw))


def test_resume_skips_a_damaged_newest_snapshot(tmp_path: Path) -> None:
    """The resume loaded the newest step by number, which turns off load()'s fallback: a
    corrupt newest snapshot stopped the run with a CorruptSnapshotError instead of resuming
    from the one before it, as docs/checkpoint.md promises for load(step=None)."""
    cfg = _cfg(checkpoint={"directory": str(tmp_path / "ck"), "fsync": False})
    s = memopt.setup(build_model(cfg), cfg)
    _train(s, cfg, 2)
    s.save(2)
    s.checkpointer.wait()
    at2 = {k: v.clone() for k, v in s.model.state_dict().items()}
    _train(s, cfg, 1)
    s.save(3)
    s.close()
    _flip_a_byte(tmp_path / "ck" / step_name(3))
    with pytest.warns(UserWarning, match="fails its .* checksum.*trying the snapshot before it"):
        again = memopt.setup(build_model(cfg), cfg)
    assert again.resumed_from == 2 and again.start_step == 2
    assert "skipped damaged step(s) [3]" in again.resume_message
    for k, v in again.model.state_dict().items():
        torch.testing.assert_close(v, at2[k], rtol=0, atol=0)
    again.close()
    _flip_a_byte(tmp_path / "ck" / step_name(2))
    damaged = r"every snapshot .* is damaged \(steps \[3, 2\]"
    with pytest.warns(UserWarning), pytest.raises(CorruptSnapshotError, match=damaged):
        memopt.setup(build_model(cfg), cfg)
