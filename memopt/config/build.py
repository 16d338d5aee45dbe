"""Turn config sections into the objects ``memopt.setup`` wires together.

- ``build_optimizer``: AdamW gets two groups (matrices decay, 1-D parameters do not); the
  low-rank optimizers get ``memopt.optim.param_groups(model, target=..., rank=...)`` (FRUGAL:
  ``density=...``) with the section's ``update_proj_gap`` / ``scale`` / ``proj``; the optimizer
  itself receives ``lr``, ``betas``, ``eps`` (when set), ``weight_decay`` and ``state_dtype``.
- ``lr_lambda``: linear warm-up to 1, then cosine to ``min_lr_ratio`` over the run (or 1).
- ``shard_config``: the ``ShardingConfig`` as ``memopt.sharding.ShardConfig``; stage 0 with an
  offload tier or a ``master_dtype`` runs as stage 1 (on one rank it is the plain update with
  the state offloaded, or applied to master copies in that dtype and copied back to the
  parameters: a bf16 model keeps fp32 master weights, as DeepSpeed's bf16 does without ZeRO;
  on several ranks ZeRO-1 replaces DDP with the same update).
- ``activation_policies``: ``policy`` (every block) or ``policies`` (named blocks) as
  ``ActivationPolicy`` objects; the planner path lives in ``setup`` (it needs a batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

import memopt.optim as mo
from memopt.config.sections import ActivationsConfig, OptimizerConfig, ShardingConfig
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.optimizer import OffloadConfig
from memopt.sharding import ShardConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": mo.AdamW,
    "galore": mo.GaLoreAdamW,
    "natural_galore": mo.NaturalGaLoreAdamW,
    "apollo": mo.ApolloAdamW,
    "apollo_mini": mo.ApolloMini,
    "frugal": mo.FrugalAdamW,
}


def default_rank(name: str) -> int:
    """``optimizer.rank``'s default (null) for ``name``: 1 for APOLLO-Mini (its rank-1 state is
    the method), 128 for GaLore, Natural GaLore and APOLLO. Shared by ``memopt.setup`` and the
    Hugging Face integration, so the same Config builds the same groups on every path."""
    return 1 if name == "apollo_mini" else 128


def low_rank_options(oc: OptimizerConfig) -> dict[str, Any]:
    """The low-rank group keywords of ``memopt.optim.param_groups`` for ``oc`` (not AdamW):
    ``update_proj_gap``, ``density`` (FRUGAL) or ``rank`` (null: ``default_rank``), and
    ``scale`` / ``proj`` / ``matmul_dtype`` when set."""
    low: dict[str, Any] = {"update_proj_gap": oc.update_proj_gap}
    if oc.name == "frugal":
        low["density"] = oc.density
    else:
        low["rank"] = oc.rank if oc.rank is not None else default_rank(oc.name)
    if oc.scale is not None:
        low["scale"] = oc.scale
    if oc.proj is not None:
        low["proj"] = oc.proj
    if oc.matmul_dtype != "auto":
        low["matmul_dtype"] = oc.matmul_dtype
    return low


def optimizer_groups(model: nn.Module, oc: OptimizerConfig) -> list[dict[str, Any]]:
    """The param groups ``oc`` asks for (see the module docstring)."""
    if oc.name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": oc.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return mo.param_groups(model, target=oc.target, weight_decay=oc.weight_decay,
                           **low_rank_options(oc))


def build_optimizer(model: nn.Module, oc: OptimizerConfig) -> torch.optim.Optimizer:
    """The memopt optimizer ``oc`` names, over ``optimizer_groups``."""
    kwargs: dict[str, Any] = {"lr": oc.lr, "betas": oc.betas, "weight_decay": oc.weight_decay}
    if oc.eps is not None:
        kwargs["eps"] = oc.eps
    if oc.state_dtype != "auto":
        kwargs["state_dtype"] = oc.state_dtype
    return _CLASSES[oc.name](optimizer_groups(model, oc), **kwargs)


def default_eps(name: str) -> float:
    """The eps the optimizer ``name`` uses when ``optimizer.eps`` is null (its own default)."""
    return float(_CLASSES[name].base_defaults["eps"])  # type: ignore[attr-defined]


def lr_lambda(oc: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``lr`` at a step: warm-up, then cosine to ``min_lr_ratio`` (or constant)."""
    warm, floor = oc.warmup_steps, oc.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if oc.schedule == "constant":
            return 1.0
        span = max(1, total_steps - warm)
        progress = min(1.0, (step - warm) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def offload_config(sc: ShardingConfig) -> OffloadConfig | None:
    if sc.offload == "none":
        return None
    return OffloadConfig(device=sc.offload, nvme_path=sc.nvme_path, hybrid=sc.hybrid_update)


def effective_stage(sc: ShardingConfig) -> Literal[0, 1, 2, 3]:
    """The ZeRO stage ``sc`` runs as (0: no sharding, DDP on several ranks). Stage 0 with an
    offload tier or a ``master_dtype`` runs as stage 1: master weights and offloaded state live
    in the sharded optimizer, and on one rank stage 1 is the plain update (no collectives).
    ``shard_config``, ``Setup.describe()`` and the estimator (``memopt.config.estimate``) all
    follow this one rule."""
    if sc.stage == 0 and (sc.offload != "none" or sc.master_dtype != "auto"):
        return 1
    return sc.stage


def shard_config(sc: ShardingConfig) -> ShardConfig | None:
    """``memopt.sharding.ShardConfig`` for ``sc`` at its ``effective_stage`` (None: stage 0,
    no offload and no master dtype)."""
    stage = effective_stage(sc)
    if stage == 0:
        return None
    layout = "dim0" if stage == 3 else ("whole_tensor" if sc.layout == "auto" else sc.layout)
    master = None if sc.master_dtype == "auto" else DTYPES[sc.master_dtype]
    return ShardConfig(
        stage=stage,
        layout=layout,
        bucket_bytes=sc.bucket_bytes,
        master_dtype=master,
        offload=offload_config(sc),
        offload_params=sc.offload_params,
        param_nvme=NVMeConfig(directory=sc.nvme_path)
        if sc.offload_params == "nvme" and sc.nvme_path
        else None,
    )


def activation_policies(model: nn.Module, ac: ActivationsConfig) -> dict[str, Any]:
    """``{block name: ActivationPolicy}`` for ``policy``/``policies`` (empty for the planner)."""
    from memopt.activations import ActivationPolicy, find_blocks

    if ac.policy:
        return {name: ActivationPolicy(ac.policy, tier=ac.tier)  # type: ignore[arg-type]
                for name, _ in find_blocks(model)}
    return {name: ActivationPolicy(action, tier=ac.tier)  # type: ignore[arg-type]
            for name, action in ac.policies.items()}
