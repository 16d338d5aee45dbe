"""A ``MemoptTrainer(memopt_shard={"stage": 2})`` run for ``accelerate launch`` (test_hf_shard.py).

Run A trains 4 steps (2 micro-batches each, clipping at 0.5) with memopt snapshots every 2
steps; run B, a fresh Trainer with another init, resumes from A's step-2 snapshot and trains
to step 4 (on one process only with ``--resume``). The global batch is the same at any world
size (4 samples per micro-batch, split over the processes; sequential sampling). The main
process saves the runs' parameters, A's logged grad norms and the world size to OUT.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist
from transformers import TrainingArguments

from memopt.integrations.hf import MemoptCallback, MemoptTrainer
from tests.integrations._exit import leave_now
from tests.integrations._tiny import Tokens, tiny_llama

GLOBAL_MICRO_BATCH = 4
# APOLLO-Mini: a seeded random projection. GaLore's SVD of a near-degenerate spectrum (rank 8
# of 64 here) turns the 1e-7 reduction-order difference of 2 ranks into 1e-3 after 4 steps
# (measured), which would test the SVD's conditioning rather than the sharding.
OPTIMIZER = os.environ.get("MEMOPT_TEST_OPTIMIZER", "apollo_mini")
OPTIONS = {"galore": {"rank": 8, "update_proj_gap": 2}, "adamw": {}, "apollo_mini": {"rank": 1}}


def _trainer(work: str, name: str, ckpt: str, seed: int) -> MemoptTrainer:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(
        output_dir=os.path.join(work, name), use_cpu=True, report_to=[], seed=0,
        per_device_train_batch_size=GLOBAL_MICRO_BATCH // world, gradient_accumulation_steps=2,
        max_grad_norm=0.5, max_steps=4, learning_rate=3e-3, weight_decay=0.01,
        lr_scheduler_type="linear", warmup_steps=1, save_strategy="no", logging_steps=1,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    return MemoptTrainer(
        model=tiny_llama(seed), args=args, train_dataset=Tokens(32),
        callbacks=[MemoptCallback(ckpt, every_n_steps=2, on_hf_save=False, fsync=False)],
        memopt_optimizer=OPTIMIZER, memopt_options=OPTIONS[OPTIMIZER],
        memopt_shard={"stage": 2},
    )  # fmt: skip


def _params(t: MemoptTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


def main(out: str, work: str) -> None:
    ck_a, ck_b = os.path.join(work, "ck_a"), os.path.join(work, "ck_b")
    a = _trainer(work, "a", ck_a, seed=0)
    a.train()
    norms = [h["grad_norm"] for h in a.state.log_history if "grad_norm" in h]
    params_a = _params(a)
    if a.args.process_index == 0:
        shutil.copytree(ck_a, ck_b)
        shutil.rmtree(os.path.join(ck_b, sorted(os.listdir(ck_b))[-1]))
    a.accelerator.wait_for_everyone()
    world = dist.get_world_size() if dist.is_initialized() else 1
    result = {"a": params_a, "norms": norms, "world": world}
    if world > 1 or "--resume" in sys.argv:  # 1-process resume: test_hf.py covers it
        b = _trainer(work, "b", ck_b, seed=1)
        b.train(resume_from_checkpoint="memopt")
        result["b"] = _params(b)
    if a.args.process_index == 0:
        torch.save(result, out)
    # nobody leaves while rank 0 saves (see memopt.sharding.shutdown_distributed)
    a.accelerator.wait_for_everyone()
    a.accelerator.end_training()
    leave_now()  # results saved, ranks left together: skip finalization (see _exit)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
