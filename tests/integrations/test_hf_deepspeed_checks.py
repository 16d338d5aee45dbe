"""The DeepSpeed refusal of the HF path, without DeepSpeed installed (test_hf_deepspeed.py runs
the real ``TrainingArguments(deepspeed=...)`` where the package is there)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from memopt.integrations._hf_checks import check_arguments  # noqa: E402
from memopt.integrations.hf_optim import create_optimizer  # noqa: E402


def test_memopt_trainer_checks_refuse_deepspeed() -> None:
    trainer = SimpleNamespace(memopt_optimizer="galore", memopt_shard=None,
                              is_deepspeed_enabled=True)  # fmt: skip
    with pytest.raises(ValueError, match="with DeepSpeed enabled") as info:
        check_arguments(trainer)
    assert "memopt_shard={'deepspeed_config'" in str(info.value)


def test_create_optimizer_refuses_deepspeed_args() -> None:
    model = torch.nn.Linear(4, 4)
    args = SimpleNamespace(deepspeed="ds_config.json", learning_rate=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"create_optimizer\(model, args, 'galore'\) with "
                                         "DeepSpeed enabled"):  # fmt: skip
        create_optimizer(model, args, "galore", rank=2)
