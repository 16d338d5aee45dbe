"""When ``MemoptCallback`` takes its snapshots inside a real ``Trainer`` (tiny LLaMA, CPU).

HF logs, evaluates and saves a step after ``on_step_end``: a snapshot due there must wait for
that step's complete TrainerState (log entry, eval, ``best_metric``), and a second
``train()`` on the same Trainer (HF counts from step 0 again) must snapshot again.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from memopt.checkpoint import AsyncCheckpointer  # noqa: E402
from memopt.integrations.hf import MemoptCallback, MemoptTrainer  # noqa: E402
from memopt.integrations.hf_callback import trainer_state_json  # noqa: E402
from memopt.integrations.hf_trainer import _snapshot_extra, find_callback  # noqa: E402
from tests.integrations._tiny import Tokens, tiny_llama  # noqa: E402
from tests.integrations.test_hf import _args, _params  # noqa: E402


def _best_trainer(out: str, ck: str, seed: int) -> MemoptTrainer:
    # every_n_steps divides save_steps and eval_steps: each snapshot step is also HF's
    cb = MemoptCallback(ck, keep=5, every_n_steps=2, fsync=False)
    args = _args(out, max_steps=6, learning_rate=0.05, eval_strategy="steps", eval_steps=2,
                 save_strategy="steps", save_steps=2, save_only_model=True,
                 load_best_model_at_end=True, metric_for_best_model="loss")  # fmt: skip
    return MemoptTrainer(model=tiny_llama(seed), args=args, train_dataset=Tokens(),
                         eval_dataset=Tokens(8), callbacks=[cb],
                         memopt_optimizer="adamw")  # fmt: skip


def _close(t: MemoptTrainer) -> None:
    cb = find_callback(t)
    assert cb is not None
    cb.close()


def test_snapshot_on_an_eval_and_save_step_resumes_like_the_uninterrupted_run(tmp_path) -> None:
    """The step-2 snapshot was taken at on_step_end, before step 2's log and eval; on_save then
    skipped the step: the resumed run lost them, with best_metric, and loaded another best."""
    a = _best_trainer(str(tmp_path / "a"), str(tmp_path / "ck_a"), seed=0)
    a.train()
    _close(a)
    state = trainer_state_json(_snapshot_extra(str(tmp_path / "ck_a"), 2))
    assert [h["step"] for h in state["log_history"]] == [1, 2, 2]  # loss and eval of step 2
    assert state["best_metric"] == a.state.log_history[2]["eval_loss"]

    shutil.copytree(tmp_path / "a", tmp_path / "c")  # HF's checkpoint-N (for the best model)
    shutil.copytree(tmp_path / "ck_a", tmp_path / "ck_c")
    for d in os.listdir(tmp_path / "ck_c"):
        if int(d.split("_")[1]) > 2:
            shutil.rmtree(tmp_path / "ck_c" / d)
    c = _best_trainer(str(tmp_path / "c"), str(tmp_path / "ck_c"), seed=3)
    c.train(resume_from_checkpoint="memopt")
    _close(c)

    def rows(t: MemoptTrainer) -> list[tuple[int, float | None]]:
        return [(h["step"], h.get("eval_loss")) for h in t.state.log_history if "loss" in h
                or "eval_loss" in h]  # fmt: skip

    assert rows(c) == rows(a)
    assert c.state.best_metric == a.state.best_metric
    assert os.path.basename(str(c.state.best_model_checkpoint)) == os.path.basename(
        str(a.state.best_model_checkpoint)
    )
    final_a = _params(a)
    for n, p in _params(c).items():
        assert torch.equal(p, final_a[n]), n


def test_last_step_snapshot_holds_the_last_eval_not_the_summary(tmp_path) -> None:
    cb = MemoptCallback(tmp_path / "ck", save_at_end=True, on_hf_save=False, fsync=False)
    args = _args(str(tmp_path / "o"), max_steps=3, eval_strategy="steps", eval_steps=3,
                 save_strategy="no")  # fmt: skip
    t = MemoptTrainer(model=tiny_llama(0), args=args, train_dataset=Tokens(),
                      eval_dataset=Tokens(8), callbacks=[cb], memopt_optimizer="adamw")  # fmt: skip
    t.train()
    cb.close()
    saved = trainer_state_json(_snapshot_extra(str(tmp_path / "ck"), 3))["log_history"]
    assert [h["step"] for h in saved] == [1, 2, 3, 3] and "eval_loss" in saved[-1]
    assert "train_loss" in t.state.log_history[-1]  # the summary, logged after the snapshot


def test_second_train_on_the_same_trainer_snapshots_again(tmp_path) -> None:
    """saved_steps kept the first train()'s steps: the second took no snapshot at all."""
    cb = MemoptCallback(tmp_path / "ck", keep=5, every_n_steps=2, on_hf_save=False, fsync=False)
    args = _args(str(tmp_path / "o"), max_steps=4, save_strategy="no")
    t = MemoptTrainer(model=tiny_llama(0), args=args, train_dataset=Tokens(), callbacks=[cb],
                      memopt_optimizer="adamw")  # fmt: skip
    t.train()
    t.train()  # HF starts again at step 0 with the trained weights
    second = _params(t)
    assert cb.saved_steps == [2, 4]
    cb.close()
    m = tiny_llama(5)
    AsyncCheckpointer(tmp_path / "ck").load(4, model=m)
    for n, p in m.named_parameters():
        assert torch.equal(p, second[n]), n
    # and a resume (newest snapshot) continues the second run, then forgets it
    cb2 = MemoptCallback(tmp_path / "ck", keep=5, every_n_steps=2, on_hf_save=False, fsync=False)
    args = _args(str(tmp_path / "r"), max_steps=5, save_strategy="no")
    r = MemoptTrainer(model=tiny_llama(1), args=args, train_dataset=Tokens(), callbacks=[cb2],
                      memopt_optimizer="adamw")  # fmt: skip
    r.train(resume_from_checkpoint="memopt")
    assert cb2.resumed_step == 4 and cb2.saved_steps == [4]
    r.train()
    assert cb2.resumed_step is None and cb2.saved_steps == [2, 4]
    cb2.close()
