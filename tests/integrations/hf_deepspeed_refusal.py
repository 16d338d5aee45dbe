"""HF's DeepSpeed integration with a memopt optimizer is refused at construction, and the route
the error names (``memopt_shard={"deepspeed_config": ...}``) runs the low-rank optimizer on
whole matrices (test_hf_deepspeed.py runs this in its own process: a DeepSpeed-enabled
``TrainingArguments`` leaves accelerate's process-wide state set up for DeepSpeed).

Before the fix ``MemoptTrainer`` was built and, under ``train()``, DeepSpeed's ZeRO flattened
every group into one 1-D buffer (GaLore became full-state Adam on it) or, with an
``"optimizer"`` block, HF built DeepSpeed's optimizer and memopt's was never created."""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import torch
from transformers import TrainingArguments

from memopt.integrations.hf import MemoptTrainer, create_optimizer
from tests.integrations._tiny import Tokens, tiny_llama

ZERO = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}  # fmt: skip
OPT_BLOCK = {**ZERO, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
NEEDLES = ("DeepSpeed enabled", "flat 1-D", "never created", "memopt_shard={'deepspeed_config'",
           "Config.from_deepspeed")  # fmt: skip


def _args(out: str, **kw: Any) -> TrainingArguments:
    return TrainingArguments(output_dir=out, use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=2, per_device_train_batch_size=4, disable_tqdm=True,
                             **kw)  # fmt: skip


def _refused(make: Any, what: str) -> None:
    try:
        make()
    except ValueError as e:
        missing = [n for n in NEEDLES if n not in str(e)]
        assert not missing, f"{what}: message lacks {missing}: {e}"
        return
    raise AssertionError(f"{what}: not refused")


def main(out: str) -> None:
    # first (accelerate keeps a DeepSpeed plugin process-wide once one was set up): the route
    # the refusal names, memopt sharding from the DeepSpeed JSON, GaLore on whole matrices
    trainer = MemoptTrainer(model=tiny_llama(), args=_args(out), train_dataset=Tokens(),
                            memopt_optimizer="galore", memopt_options={"rank": 8},
                            memopt_shard={"deepspeed_config": ZERO})  # fmt: skip
    trainer.train()
    inner = trainer.optimizer.optimizer.inner  # Accelerated -> Sharded -> GaLoreAdamW
    low = [(p, inner.state[p]) for g in inner.param_groups if g.get("rank") for p in g["params"]]
    assert low and all(p.dim() == 2 for p, _ in low), [tuple(p.shape) for p, _ in low]
    for p, st in low:
        assert st["exp_avg"].numel() < p.numel(), (tuple(p.shape), tuple(st["exp_avg"].shape))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    for ds, name in ((ZERO, "galore"), (OPT_BLOCK, "adamw")):
        args = _args(out, deepspeed=ds)
        _refused(partial(MemoptTrainer, model=tiny_llama(), args=args, train_dataset=Tokens(),
                         memopt_optimizer=name, memopt_options={}),
                 f"MemoptTrainer({name}) with deepspeed={sorted(ds)}")  # fmt: skip
        _refused(partial(create_optimizer, tiny_llama(), args, "galore", rank=8),
                 "create_optimizer with args.deepspeed")  # fmt: skip
    print("DEEPSPEED REFUSAL OK")


if __name__ == "__main__":
    main(sys.argv[1])
