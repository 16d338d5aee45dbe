"""``estimate(config, world_size)``: the memory estimator (``memopt.memory.estimate``) for a
``memopt.Config``, before anything is allocated: the model is the Config's LLaMA built on the
meta device, and the estimator's fields come from the Config's sections:

- ``optimizer.name`` / ``target`` / ``rank`` / ``density`` / ``proj`` / ``state_dtype``
  (``rank`` and ``proj`` only for the low-rank optimizers, as ``build`` passes them);
- ``sharding.stage`` / ``layout`` / ``master_dtype`` / ``bucket_bytes`` / ``offload`` /
  ``offload_params`` (stage 0 with an offload tier or a master dtype runs as stage 1, as
  ``memopt.setup`` does: ``build.effective_stage``);
- ``model.dtype``, ``model.device`` (``auto``: CUDA when available);
- ``train.batch_size`` / ``seq_len``, traced without a KV cache (``use_cache=False``, as
  ``memopt run`` trains), and ``train.grad_accum`` (the later micro-batches run with every
  gradient live);
- ``activations.policy`` when it is ``keep``, ``recompute`` or ``swap`` for every block.
  A planner budget (``activations.budget``) is not modelled: the estimate then assumes
  ``keep`` and says so in its notes (``memopt.activations.plan`` predicts its own peak).

``memopt estimate --recipe RECIPE.yaml [key=value ...] --world-size N`` prints it.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.config.build import default_rank, effective_stage
from memopt.config.config import Config
from memopt.config.setup import resolve_device
from memopt.config.workload import llama_config

__all__ = ["estimate", "estimate_kwargs"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def estimate_kwargs(config: Config, world_size: int = 1) -> dict[str, Any]:
    """The ``memopt.memory.estimate`` keywords for ``config`` at ``world_size`` ranks."""
    o, sc, ac = config.optimizer, config.sharding, config.activations
    opt_kw: dict[str, Any] = {}
    if o.name == "frugal":
        opt_kw["density"] = o.density
    elif o.name != "adamw":  # as memopt.config.build: AdamW has none, null is default_rank
        opt_kw["rank"] = o.rank if o.rank is not None else default_rank(o.name)
    if o.proj is not None and o.name != "adamw":
        opt_kw["proj"] = o.proj
    if o.state_dtype != "auto":
        opt_kw["state_dtype"] = o.state_dtype
    stage = effective_stage(sc)  # (stage 0 with offload or master_dtype runs as stage 1)
    choice = config.model.device  # an explicit "cuda" is estimated even on a CPU-only host
    device = resolve_device("auto").type if choice == "auto" else choice
    return {
        "optimizer": o.name,
        "optimizer_kwargs": opt_kw,
        "target": o.target,
        "stage": stage,
        "world_size": world_size,
        "layout": None if sc.layout == "auto" or stage == 3 else sc.layout,
        "param_dtype": _DTYPES[config.model.dtype],
        "master_dtype": None if sc.master_dtype == "auto" else _DTYPES[sc.master_dtype],
        "offload": None if sc.offload == "none" else sc.offload,
        "offload_params": None if sc.offload_params == "none" else sc.offload_params,
        "batch_size": config.train.batch_size,
        "seq_len": config.train.seq_len,
        "grad_accum": config.train.grad_accum,
        "activation_policy": ac.policy if ac.policy in ("keep", "recompute", "swap") else "keep",
        "bucket_bytes": sc.bucket_bytes,
        "device_kind": device,
    }


def estimate(config: Config, world_size: int = 1) -> Any:
    """Predicted peak bytes per tier (``MemoryEstimate``) of one rank of ``config``."""
    from memopt.memory import estimate as memory_estimate

    model_config = llama_config(config)  # use_cache off, as memopt run trains
    result = memory_estimate(model_config, **estimate_kwargs(config, world_size))
    ac = config.activations
    if ac.budget or ac.policies or (ac.policy and ac.policy not in ("keep", "recompute", "swap")):
        result.notes.append(
            "activations: the planner budget / per-block policies are not modelled here "
            "(estimated as 'keep'); memopt.activations.plan predicts the managed peak"
        )
    return result
