"""``MemoptCallback(dir)`` set up so that it never takes a snapshot warns once at train().

``save_strategy="no"`` (integrations.md's first snippet) with ``MemoptCallback("ckpt/",
keep=3)`` (migrating.md's table) trained with no snapshot and no word about it; a later
``resume_from_checkpoint="memopt"`` started from step 0 (sweep44 F3)."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

from transformers import TrainingArguments  # noqa: E402

from memopt.integrations.hf import MemoptCallback, MemoptTrainer  # noqa: E402
from tests.integrations._tiny import Tokens, tiny_llama  # noqa: E402


def _args(out: str, **kw: object) -> TrainingArguments:
    base: dict[str, object] = dict(
        output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=2,
        logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


def _never(w: list[warnings.WarningMessage]) -> list[str]:
    return [str(x.message) for x in w if "will take no snapshot" in str(x.message)]


def test_save_strategy_no_without_own_schedule_warns_once(tmp_path) -> None:
    ck = tmp_path / "ck"
    cb = MemoptCallback(ck, keep=3, fsync=False)
    args = _args(str(tmp_path / "o"), save_strategy="no")
    t = MemoptTrainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[cb],
                      memopt_options={"rank": 8})  # fmt: skip
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.train()
        t.train()  # (a second train() of the same callback: still once)
    found = _never(w)
    assert len(found) == 1, found
    assert str(ck) in found[0] and "save_strategy='no'" in found[0]
    assert "every_n_steps=N" in found[0] and "save_at_end=True" in found[0]
    assert cb.checkpointer is not None and cb.checkpointer.steps() == []  # (what it warns of)
    cb.close()


class _Args:
    def __init__(self, save_strategy: str) -> None:
        self.save_strategy = save_strategy
        self.per_device_train_batch_size = 4


class _State:
    global_step = 0


@pytest.mark.parametrize(
    ("kw", "strategy", "warns"),
    [({}, "no", True),
     ({"on_hf_save": False}, "steps", True),
     ({}, "steps", False),
     ({"every_n_steps": 5}, "no", False),
     ({"save_at_end": True}, "no", False)],
)  # fmt: skip
def test_which_settings_warn(tmp_path, kw, strategy, warns) -> None:
    cb = MemoptCallback(tmp_path / "ck", fsync=False, **kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cb.on_train_begin(_Args(strategy), _State(), None)
    found = _never(w)
    assert len(found) == int(warns), found
    if warns and not kw:
        assert "save_strategy='steps'" in found[0]
    if warns and kw:
        assert "on_hf_save=False" in found[0] and "save_strategy='steps'" not in found[0]
    cb.close()


def test_memory_logging_only_does_not_warn() -> None:
    cb = MemoptCallback(on_hf_save=False)  # no directory: a memory logger, by choice
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cb.on_train_begin(_Args("no"), _State(), None)
    assert _never(w) == []
