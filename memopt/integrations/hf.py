"""Hugging Face ``Trainer`` integration (needs ``transformers``; ``import memopt`` does not).

- ``create_optimizer(model, args, name="galore", rank=..., target=...)``: a memopt optimizer
  whose every param group carries the TrainingArguments' ``learning_rate``, ``weight_decay``
  (0 for biases and norm scales), ``adam_beta1/2`` and ``adam_epsilon``; HF's scheduler wraps
  it as usual. ``MemoptTrainer`` calls it from ``Trainer.create_optimizer``.
- ``MemoptCallback(checkpoint_dir=..., keep=...)``: async memopt snapshots on ``on_save`` and/or
  every n steps, fenced before the next optimizer step, waited on at ``on_train_end``; memory
  per tier in ``on_log``.
- ``resume(trainer)`` / ``MemoptTrainer.train(resume_from_checkpoint="memopt")``: resume the
  Trainer (step, data position, RNG, model, optimizer, scheduler) from a memopt snapshot.

See docs/integrations.md.
"""

from __future__ import annotations

from memopt.integrations._memory import format_memory, memory_by_tier
from memopt.integrations.hf_callback import MemoptCallback, unwrap_model, unwrap_optimizer
from memopt.integrations.hf_config import trainer_options, training_arguments
from memopt.integrations.hf_optim import OPTIMIZERS, create_optimizer, hf_param_groups
from memopt.integrations.hf_trainer import MemoptTrainer, resume

__all__ = [
    "OPTIMIZERS",
    "MemoptCallback",
    "MemoptTrainer",
    "create_optimizer",
    "format_memory",
    "hf_param_groups",
    "memory_by_tier",
    "resume",
    "trainer_options",
    "training_arguments",
    "unwrap_model",
    "unwrap_optimizer",
]
