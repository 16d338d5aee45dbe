"""memopt.integrations.hf with a real ``transformers.Trainer`` on a tiny LLaMA (CPU)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from memopt.integrations.hf import (  # noqa: E402
    MemoptCallback,
    MemoptTrainer,
    create_optimizer,
    resume,
)
from memopt.integrations.hf_trainer import find_callback  # noqa: E402
from tests.integrations._tiny import Tokens, tiny_llama  # noqa: E402

LR, WD, B1, B2, EPS = 3e-3, 0.05, 0.8, 0.95, 1e-7


def _args(out: str, **kw: object) -> TrainingArguments:
    base: dict[str, object] = dict(
        output_dir=out, learning_rate=LR, weight_decay=WD, adam_beta1=B1, adam_beta2=B2,
        adam_epsilon=EPS, use_cpu=True, report_to=[], per_device_train_batch_size=4,
        max_steps=6, logging_steps=1, seed=0, dataloader_num_workers=0,
        lr_scheduler_type="linear", warmup_steps=2, disable_tqdm=True,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,opts",
    [
        ("galore", {"rank": 8}),
        ("apollo", {"rank": 8}),
        ("apollo_mini", {"rank": 1}),
        ("frugal", {"density": 0.5}),
        ("natural_galore", {"rank": 8}),
        ("adamw", {}),
    ],
)
def test_create_optimizer_carries_training_arguments(tmp_path, name, opts) -> None:
    model = tiny_llama()
    opt = create_optimizer(model, _args(str(tmp_path)), name, **opts)
    seen: list[int] = []
    for g in opt.param_groups:
        assert g["lr"] == LR and g["betas"] == (B1, B2) and g["eps"] == EPS, g.keys()
        one_d = [p.dim() < 2 for p in g["params"]]
        assert all(one_d) or not any(one_d), "1-D and 2-D parameters share a group"
        assert g["weight_decay"] == (0.0 if all(one_d) else WD)
        seen += [id(p) for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    if name != "adamw":
        assert any("rank" in g or "density" in g for g in opt.param_groups)


def test_hf_builtin_galore_drops_weight_decay(tmp_path) -> None:
    """The claim in docs/integrations.md: HF's optim='galore_adamw' loses wd, betas and eps."""
    pytest.importorskip("galore_torch")
    args = _args(str(tmp_path), optim="galore_adamw", optim_target_modules=["attn", "mlp"])
    opt = Trainer(model=tiny_llama(), args=args, train_dataset=Tokens()).create_optimizer()
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert all(g["betas"] != (B1, B2) and g["eps"] != EPS for g in opt.param_groups)


def _trainer(out: str, ckpt: str, seed: int, **cb_kw: object) -> MemoptTrainer:
    cb = MemoptCallback(ckpt, keep=3, fsync=False, **cb_kw)  # type: ignore[arg-type]
    return MemoptTrainer(
        model=tiny_llama(seed),
        args=_args(out, save_strategy="steps", save_steps=3, save_only_model=True),
        train_dataset=Tokens(),
        callbacks=[cb],
        memopt_optimizer="galore",
        memopt_options={"rank": 8, "update_proj_gap": 2, "target": "attn|mlp"},
    )


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_trainer_snapshots_and_resumes_bitwise(tmp_path, caplog) -> None:
    a = _trainer(str(tmp_path / "a"), str(tmp_path / "ck_a"), seed=0)
    a.train()
    cb_a = find_callback(a)
    assert (
        cb_a is not None and cb_a.checkpointer is not None and cb_a.checkpointer.steps() == [3, 6]
    )
    assert cb_a.saved_steps == [3, 6]
    final = _params(a)
    # the scheduler wraps the memopt optimizer: every group ends at the schedule's LR
    last_lr = a.lr_scheduler.get_last_lr()
    assert last_lr == [g["lr"] for g in a.optimizer.param_groups] and last_lr[0] == 0.0
    mem = cb_a.memory_history
    assert len(mem) >= 6 and all(m["mem/host_rss_mib"] > 0 for m in mem)
    assert mem[-1]["mem/arena_mib"] >= 0
    cb_a.close()

    # a fresh Trainer (other init) resumes from the newest snapshot of a copy holding step 3
    shutil.copytree(tmp_path / "ck_a", tmp_path / "ck_b")
    shutil.rmtree(tmp_path / "ck_b" / sorted(os.listdir(tmp_path / "ck_b"))[-1])
    b = _trainer(str(tmp_path / "b"), str(tmp_path / "ck_b"), seed=1)
    assert any(not torch.equal(p, final[n]) for n, p in _params(b).items())
    with caplog.at_level(logging.INFO, logger="memopt"):
        b.train(resume_from_checkpoint="memopt")
    assert "resumed from snapshot step 3" in caplog.text
    assert b.state.global_step == 6
    for n, p in _params(b).items():
        assert torch.equal(p, final[n]), n  # bitwise: same batches, same state, same kernels
    cb_b = find_callback(b)
    assert cb_b is not None and cb_b.checkpointer is not None
    assert cb_b.checkpointer.steps() == [3, 6]
    cb_b.close()


def test_memopt_trainer_takes_the_directory_resume_returns(tmp_path) -> None:
    """docs/integrations.md: resume(trainer, step=k) returns a directory to pass to
    train(resume_from_checkpoint=...). A MemoptTrainer refused it (it holds no optimizer.pt,
    which its HF-checkpoint check asked for), so a chosen step could not be resumed."""
    a = _trainer(str(tmp_path / "a"), str(tmp_path / "ck_a"), seed=0)
    a.train()
    find_callback(a).close()  # type: ignore[union-attr]
    shutil.copytree(tmp_path / "ck_a", tmp_path / "ck_c")
    c = _trainer(str(tmp_path / "c"), str(tmp_path / "ck_c"), seed=1)
    path = resume(c, step=3)
    assert path is not None
    c.train(resume_from_checkpoint=path)
    assert c.state.global_step == 6
    for n, p in _params(c).items():
        assert torch.equal(p, _params(a)[n]), n  # resumed at step 3, bitwise as uninterrupted
    find_callback(c).close()  # type: ignore[union-attr]


def test_resume_without_snapshot_and_bad_arguments(tmp_path) -> None:
    t = _trainer(str(tmp_path / "o"), str(tmp_path / "empty"), seed=0)
    assert resume(t) is None
    with pytest.raises(FileNotFoundError, match="published"):
        resume(t, step=5)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        MemoptCallback()
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoptCallback(str(tmp_path), every_n_steps=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer(tiny_llama(), _args(str(tmp_path)), "adam8")
    with pytest.raises(TypeError, match="learning_rate"):
        create_optimizer(tiny_llama(), object(), "galore", rank=4)


def test_every_n_steps_and_activation_budget(tmp_path) -> None:
    """Snapshots every 2 steps with HF's own saving off; the planner's per-block policies
    (installed in on_train_begin) leave the training arithmetic unchanged."""

    def run(out: str, cb: MemoptCallback) -> MemoptTrainer:
        t = MemoptTrainer(
            model=tiny_llama(0),
            args=_args(out, save_strategy="no", max_steps=4),
            train_dataset=Tokens(),
            callbacks=[cb],
            memopt_optimizer="apollo_mini",
            memopt_options={"rank": 1},
        )
        t.train()
        return t

    cb = MemoptCallback(
        tmp_path / "ck", every_n_steps=2, activation_budget="50%", fsync=False, on_hf_save=False
    )
    with_plan = run(str(tmp_path / "x"), cb)
    assert cb.checkpointer is not None and cb.checkpointer.steps() == [2, 4]
    assert not [d for d in os.listdir(tmp_path / "x") if d.startswith("checkpoint-")]
    assert cb.activations is not None
    report = cb.activations.report()
    assert "model.layers.0" in report and "model.layers.1" in report
    cb.close()
    assert cb.activations is None
    plain = run(str(tmp_path / "y"), MemoptCallback(on_hf_save=False))
    for n, p in _params(plain).items():
        torch.testing.assert_close(_params(with_plan)[n], p, atol=1e-6, rtol=0, msg=n)


def test_sharded_trainer_refuses_hf_optimizer_checkpoints(tmp_path) -> None:
    with pytest.raises(ValueError, match="save_only_model=True"):
        MemoptTrainer(
            model=tiny_llama(),
            args=_args(str(tmp_path), save_strategy="steps", save_steps=2),
            train_dataset=Tokens(),
            memopt_optimizer="adamw",
            memopt_shard={"stage": 2},
        )


def test_sharded_trainer_refuses_stage3_with_accumulation(tmp_path) -> None:
    with pytest.raises(NotImplementedError, match="stage 3.*gradient_accumulation_steps > 1"):
        MemoptTrainer(
            model=tiny_llama(),
            args=_args(str(tmp_path), save_strategy="no", gradient_accumulation_steps=2),
            train_dataset=Tokens(),
            memopt_optimizer="adamw",
            memopt_shard={"stage": 3},
        )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [({"memopt_optimizer": "GaLore"}, ValueError, "memopt_optimizer 'GaLore' unknown"),
     ({"memopt_options": {"rnak": 8}}, ValueError, r"unknown param-group option\(s\) \['rnak'\]"),
     ({"memopt_shard": {"stgae": 2}}, ValueError, r"memopt_shard keys \['stgae'\] unknown"),
     ({"memopt_shard": 2}, TypeError, "memopt_shard must be a dict")],
)  # fmt: skip
def test_trainer_arguments_are_checked_at_construction(tmp_path, kwargs, exc, match) -> None:
    # (they failed only at train(), the last one deep inside memopt.shard)
    with pytest.raises(exc, match=match):
        MemoptTrainer(model=tiny_llama(), args=_args(str(tmp_path), save_strategy="no"),
                      train_dataset=Tokens(), **kwargs)  # fmt: skip


def test_callback_budget_is_checked_at_construction(tmp_path) -> None:
    with pytest.raises(ValueError, match="budget='lots' is not a size"):
        MemoptCallback(str(tmp_path), activation_budget="lots")
    with pytest.raises(ValueError, match=r"unknown checkpoint option\(s\) \['fsyncc'\]"):
        MemoptCallback(str(tmp_path), fsyncc=True)  # failed only at train()
    from memopt.checkpoint import AsyncCheckpointer

    with AsyncCheckpointer(tmp_path / "b") as ck:  # the messages named the other directory
        with pytest.raises(ValueError, match="checkpoint_dir=... or checkpointer=..., not both"):
            MemoptCallback(str(tmp_path / "a"), checkpointer=ck)


def test_trainer_from_memopt_config(tmp_path) -> None:
    from memopt import Config
    from memopt.integrations.hf import training_arguments, unwrap_optimizer

    cfg = Config.from_dict({
        "train": {"steps": 4, "batch_size": 4},
        "optimizer": {"name": "galore", "lr": 2e-3, "weight_decay": 0.05, "betas": [0.8, 0.95],
                      "eps": 1e-7, "rank": 8, "update_proj_gap": 2, "warmup_steps": 1,
                      "min_lr_ratio": 0.25},
        "checkpoint": {"directory": str(tmp_path / "ck"), "every_n_steps": 2, "fsync": False},
    })  # fmt: skip
    args = training_arguments(cfg)
    assert (args["learning_rate"], args["adam_beta1"], args["max_steps"]) == (2e-3, 0.8, 4)
    t = MemoptTrainer.from_config(
        cfg, output_dir=str(tmp_path / "out"), model=tiny_llama(0), train_dataset=Tokens()
    )
    t.args.use_cpu, t.args.report_to, t.args.disable_tqdm = True, [], True
    t.train()
    opt = unwrap_optimizer(t.optimizer)
    assert type(opt).__name__ == "GaLoreAdamW"
    low = [g for g in opt.param_groups if g.get("rank") is not None]
    assert low and all(g["rank"] == 8 and g["update_proj_gap"] == 2 for g in low)
    assert all(g["weight_decay"] == 0.05 and g["betas"] == (0.8, 0.95) for g in low)
    # the Config's schedule: cosine down to min_lr_ratio x lr at the last step
    assert t.lr_scheduler.get_last_lr()[0] == pytest.approx(2e-3 * 0.25)
    cb = find_callback(t)
    assert cb is not None and cb.checkpointer is not None and cb.checkpointer.steps() == [2, 4]
    cb.close()
    with pytest.raises(ValueError, match="optimizer.in_backward"):
        MemoptTrainer.from_config(cfg.replace(["optimizer.in_backward=true"]), model=tiny_llama(0))


def test_stage3_save_model_gathers_the_dtensor_shards(tmp_path) -> None:
    """memopt's stage 3 holds FSDP2 DTensor shards: HF's save_pretrained crashed in
    safetensors ("invalid python storage"). A 1-rank FSDP2 mesh gives the same parameters."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    model = tiny_llama(0)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    t = MemoptTrainer(model=model, args=_args(str(tmp_path), save_strategy="no"),
                      train_dataset=Tokens(), memopt_optimizer="adamw")  # fmt: skip
    t.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert sorted(saved) == sorted(full)
    for n, p in full.items():
        assert torch.equal(saved[n], p), n


def test_stage3_refuses_load_best_model_at_end(tmp_path) -> None:
    args = _args(str(tmp_path), save_strategy="steps", save_only_model=True, eval_strategy="steps",
                 load_best_model_at_end=True)  # fmt: skip
    with pytest.raises(NotImplementedError, match="stage 3.*load_best_model_at_end.*stage 2"):
        MemoptTrainer(model=tiny_llama(), args=args, train_dataset=Tokens(),
                      eval_dataset=Tokens(4), memopt_optimizer="adamw",
                      memopt_shard={"stage": 3})  # fmt: skip


def test_hf_resume_without_optimizer_state_is_refused(tmp_path) -> None:
    """memopt_shard requires save_only_model=True; HF's resume from such a checkpoint-N
    restarted the optimizer and the LR warm-up without a word."""

    def trainer(seed: int) -> MemoptTrainer:
        args = _args(str(tmp_path), max_steps=3, save_strategy="steps", save_steps=3,
                     save_only_model=True)  # fmt: skip
        return MemoptTrainer(model=tiny_llama(seed), args=args, train_dataset=Tokens(),
                             memopt_optimizer="adamw", memopt_shard={"stage": 2})  # fmt: skip

    trainer(0).train()
    b = trainer(1)
    for target in (True, str(tmp_path / "checkpoint-3")):
        with pytest.raises(ValueError, match="no optimizer state.*from_checkpoint='memopt'"):
            b.train(resume_from_checkpoint=target)
    assert b.state.global_step == 0


def test_memory_figures_reach_log_history_and_every_callback(tmp_path) -> None:
    """mem/* were added in MemoptCallback.on_log: after Trainer.log had copied the logs into
    log_history and after the report_to integrations (registered before user callbacks) saw
    them; and they leaked into the dicts that train() and evaluate() return."""
    from transformers import TrainerCallback

    class Spy(TrainerCallback):  # stands where report_to integrations stand: before ours
        seen: list[bool] = []

        def on_log(self, args: object, state: object, control: object, logs: dict[str, float],
                   **kw: object) -> None:  # fmt: skip
            self.seen.append("mem/host_rss_mib" in logs)

    def run(cls: type[Trainer], **kw: object) -> tuple[Trainer, dict[str, float], MemoptCallback]:
        cb = MemoptCallback(on_hf_save=False)
        t = cls(model=tiny_llama(0), args=_args(str(tmp_path), max_steps=2, save_strategy="no"),
                train_dataset=Tokens(), eval_dataset=Tokens(4), callbacks=[cb], **kw)  # fmt: skip
        t.callback_handler.callbacks.insert(1, Spy())
        out = t.train()
        assert not [k for k in out.metrics if k.startswith("mem/")]
        return t, t.evaluate(), cb

    t, ev, cb = run(MemoptTrainer, memopt_optimizer="adamw")
    assert Spy.seen and all(Spy.seen)
    assert all(h["mem/host_rss_mib"] > 0 for h in t.state.log_history)
    assert "epoch" in ev and not [k for k in ev if k.startswith("mem/")]
    assert len(cb.memory_history) == len(t.state.log_history)
    # a plain Trainer: log_history gets them (its entry is updated in on_log)
    Spy.seen = []
    t, ev, _ = run(Trainer, optimizers=(create_optimizer(tiny_llama(0), _args(str(tmp_path)),
                                                         "adamw"), None))  # fmt: skip
    assert all("mem/host_rss_mib" in h for h in t.state.log_history)
    assert not [k for k in ev if k.startswith("mem/")]


def test_ignored_hf_optimizer_arguments_warn(tmp_path) -> None:
    args = _args(str(tmp_path), save_strategy="no", optim="galore_adamw",
                 optim_target_modules=["q_proj"], optim_args="rank=8, gap=50")  # fmt: skip
    said = (r"ignores the TrainingArguments optim='galore_adamw', optim_args='rank=8, gap=50', "
            r"optim_target_modules=\['q_proj'\]: .*memopt_optimizer='galore' with "
            r"\{'target': 'attn\|mlp', 'rank': 128\}")  # fmt: skip
    with pytest.warns(UserWarning, match=said):
        MemoptTrainer(model=tiny_llama(), args=args, train_dataset=Tokens())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default optim (plain AdamW): nothing to say
        MemoptTrainer(model=tiny_llama(), args=_args(str(tmp_path), save_strategy="no"),
                      train_dataset=Tokens(), memopt_optimizer="adamw")  # fmt: skip
