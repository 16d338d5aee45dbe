"""``MemoptTrainer.from_config``: every Config key reaches the Trainer or is refused by name
(rank defaults, sharding with HF's save strategy, the activation NVMe directory, seed,
log_every, checkpoint.resume), and resume from a ``MemoptCallback(checkpointer=...)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from memopt import Config  # noqa: E402
from memopt.checkpoint import AsyncCheckpointer  # noqa: E402
from memopt.integrations.hf import (  # noqa: E402
    MemoptCallback,
    MemoptTrainer,
    trainer_options,
    training_arguments,
    unwrap_optimizer,
)
from memopt.integrations.hf_trainer import find_callback  # noqa: E402
from tests.integrations._tiny import Tokens, tiny_llama  # noqa: E402


class Steps(TrainerCallback):
    """The optimizer steps a run takes."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.steps.append(state.global_step)


def _quiet(t: MemoptTrainer) -> MemoptTrainer:
    t.args.use_cpu, t.args.report_to, t.args.disable_tqdm = True, [], True
    return t


def _cfg(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {"train": {"steps": 2, "batch_size": 4}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return Config.from_dict(data)


@pytest.mark.parametrize(
    "name,rank", [("galore", 128), ("apollo", 128), ("apollo_mini", 1), ("natural_galore", 128)]
)
def test_from_config_null_rank_takes_the_config_default(tmp_path, name, rank) -> None:
    cfg = _cfg(tmp_path, optimizer={"name": name})
    assert trainer_options(cfg)["memopt_options"]["rank"] == rank
    t = MemoptTrainer.from_config(
        cfg, output_dir=str(tmp_path), model=tiny_llama(0), train_dataset=Tokens()
    )
    opt = unwrap_optimizer(t.create_optimizer())
    low = [g for g in opt.param_groups if g.get("rank") is not None]
    assert low and all(g["rank"] == rank for g in low)


def test_trainer_class_default_galore_without_options(tmp_path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    t = MemoptTrainer(model=tiny_llama(0), args=args, train_dataset=Tokens())
    opt = t.create_optimizer()
    assert type(opt).__name__ == "GaLoreAdamW"
    assert any(g.get("rank") == 128 for g in opt.param_groups)
    t2 = MemoptTrainer(model=tiny_llama(0), args=args, memopt_optimizer="frugal")
    assert any(g.get("density") == 0.25 for g in t2.create_optimizer().param_groups)


def test_from_config_sharding_saves_memopt_snapshots_only(tmp_path) -> None:
    ck = str(tmp_path / "ck")
    cfg = _cfg(
        tmp_path,
        optimizer={"name": "adamw"},
        sharding={"stage": 2},
        checkpoint={"directory": ck, "fsync": False},  # every_n_steps 0: only at the end
    )
    assert training_arguments(cfg)["save_strategy"] == "no"
    assert "save_strategy" not in training_arguments(_cfg(tmp_path))
    t = _quiet(
        MemoptTrainer.from_config(
            cfg, output_dir=str(tmp_path / "out"), model=tiny_llama(0), train_dataset=Tokens()
        )
    )
    assert t.memopt_shard is not None and t.memopt_shard["stage"] == 2
    t.train()
    cb = find_callback(t)
    assert cb is not None and cb.checkpointer is not None and cb.checkpointer.steps() == [2]
    assert not [d for d in os.listdir(tmp_path / "out") if d.startswith("checkpoint-")]
    cb.close()


def test_from_config_activation_nvme_path_reaches_apply(tmp_path) -> None:
    from memopt.integrations import apply_budget

    nvme = str(tmp_path / "act")
    os.makedirs(nvme)
    cfg = _cfg(
        tmp_path,
        optimizer={"name": "adamw"},
        activations={"budget": "90%", "tier": "nvme", "nvme_path": nvme,
                     "actions": ["keep", "swap"]},
    )  # fmt: skip
    (cb,) = trainer_options(cfg)["callbacks"]
    assert cb.activation_options["options"].nvme.directory == nvme
    t = _quiet(
        MemoptTrainer.from_config(
            cfg, output_dir=str(tmp_path / "out"), model=tiny_llama(0), train_dataset=Tokens()
        )
    )
    t.train()
    cb = find_callback(t)
    assert cb is not None and cb.activations is not None
    swapped = [n for n, p in cb.activations.policies.items() if p.action == "swap"]
    assert swapped and all(cb.activations.policies[n].tier == "nvme" for n in swapped)
    cb.close()
    with pytest.raises(ValueError, match="tier='nvme'"):
        apply_budget(tiny_llama(0), None, "50%", tier="nvme")


def test_from_config_seed_log_every_and_resume(tmp_path) -> None:
    ck = str(tmp_path / "ck")
    cfg = _cfg(
        tmp_path,
        optimizer={"name": "adamw"},
        train={"seed": 7, "log_every": 3},
        checkpoint={"directory": ck, "every_n_steps": 2, "fsync": False},
    )
    kw = training_arguments(cfg)
    assert (kw["seed"], kw["logging_steps"]) == (7, 3)
    assert trainer_options(cfg)["memopt_resume"] is True
    assert trainer_options(cfg.replace(["checkpoint.resume=false"]))["memopt_resume"] is False

    def run(config: Config) -> tuple[MemoptTrainer, Steps]:
        seen = Steps()
        t = _quiet(
            MemoptTrainer.from_config(
                config, output_dir=str(tmp_path / "out"), model=tiny_llama(0),
                train_dataset=Tokens(), callbacks=[seen],
            )
        )  # fmt: skip
        assert t.args.seed == 7
        t.train()
        cb = find_callback(t)
        assert cb is not None
        cb.close()
        return t, seen

    _, first = run(cfg)
    assert first.steps == [1, 2]
    _, second = run(cfg.replace(["train.steps=4"]))  # resumes at the step-2 snapshot
    assert second.steps == [3, 4]
    assert AsyncCheckpointer(ck).steps() == [2, 4]


def test_resume_finds_the_snapshots_of_a_given_checkpointer(tmp_path) -> None:
    ck = str(tmp_path / "ck")

    def trainer(steps: int) -> tuple[MemoptTrainer, MemoptCallback, Steps]:
        cb = MemoptCallback(checkpointer=AsyncCheckpointer(ck, fsync=False), every_n_steps=2)
        seen = Steps()
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
            use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        t = MemoptTrainer(
            model=tiny_llama(0), args=args, train_dataset=Tokens(),
            memopt_optimizer="adamw", callbacks=[cb, seen],
        )  # fmt: skip
        return t, cb, seen

    t, cb, _ = trainer(2)
    t.train()
    cb.close()
    t, cb, seen = trainer(4)
    t.train(resume_from_checkpoint="memopt")
    assert seen.steps == [3, 4] and cb.resumed_step == 2
    assert cb.checkpointer is not None and cb.checkpointer.steps() == [2, 4]
    cb.close()


class _LR(TrainerCallback):
    def __init__(self) -> None:
        self.lr: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.lr.append(kw["optimizer"].param_groups[0]["lr"])


def test_from_config_runs_memopt_runs_eps_and_schedule(tmp_path) -> None:
    """One Config, two paths: the Trainer gets the optimizer's own eps when optimizer.eps is
    null (GaLore 1e-6, not HF's 1e-8) and memopt run's warm-up and cosine, step for step."""
    import memopt
    from memopt.config.build import lr_lambda

    cfg = _cfg(tmp_path, optimizer={"name": "galore", "rank": 8, "lr": 1e-3, "warmup_steps": 3},
               train={"steps": 8})  # fmt: skip
    lam = lr_lambda(cfg.optimizer, cfg.train.steps)
    expect = [1e-3 * lam(i) for i in range(cfg.train.steps)]
    rec = _LR()
    t = _quiet(MemoptTrainer.from_config(cfg, output_dir=str(tmp_path), model=tiny_llama(0),
                                         train_dataset=Tokens(), callbacks=[rec]))  # fmt: skip
    t.train()
    assert unwrap_optimizer(t.optimizer).param_groups[0]["eps"] == 1e-6
    assert rec.lr == pytest.approx(expect, rel=1e-12)
    s = memopt.setup(tiny_llama(0), cfg)
    assert s.optimizer.param_groups[0]["eps"] == 1e-6


def test_apply_budget_plans_with_the_swap_threshold_it_applies() -> None:
    """The planner prices saves under min_swap_bytes as staying on the device; apply_budget
    planned with the default (4096) while applying the caller's threshold."""
    import torch

    from memopt.activations import ActivationOptions
    from memopt.integrations import apply_budget

    model = tiny_llama(0)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    mgr = apply_budget(model, batch, "90%", options=ActivationOptions(min_swap_bytes=0),
                       actions=["keep", "swap"])  # fmt: skip
    assert "swap" in {p.action for p in mgr.policies.values()}
    mgr.remove()
    # every save held on the device: swapping frees nothing, so 90% is out of reach
    with pytest.raises(ValueError, match="minimum reachable budget"):
        apply_budget(model, batch, "90%", options=ActivationOptions(min_swap_bytes=1 << 30),
                     actions=["keep", "swap"])  # fmt: skip


def test_training_arguments_run_on_the_cpu_where_memopt_setup_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CPU ranks under torchrun, HF's Accelerator must be made for CPU (MULTI_CPU) or it
    # sees one process and memopt.shard refuses the run; memopt.setup resolves the device so.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_arguments(_cfg(tmp_path))["use_cpu"] is True
    assert training_arguments(_cfg(tmp_path, model={"device": "cpu"}))["use_cpu"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "use_cpu" not in training_arguments(_cfg(tmp_path))
    assert "use_cpu" not in training_arguments(_cfg(tmp_path, model={"device": "cuda"}))
