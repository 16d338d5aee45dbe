"""Optimizer-state offload under ZeRO 1/2: swap the sharded optimizer's inner AdamW for an
``OffloadedAdamW`` whose fp32 master weights and moments live on a tier.

``ShardedOptimizer`` first places every parameter (its local tensors are views of the model's
own parameters: ``master_dtype`` is not used for them, since the fp32 master lives on the
tier); then ``offload_inner`` builds an ``OffloadedAdamW`` over the same param groups (same
positions, same hyperparameters) and makes it the inner optimizer. Each step the owned shards'
state streams through the pipeline (see ``memopt.offload.pipeline``), the update is written
straight into the model's parameter shard (bf16/fp16 through the kernel's fused copy-back),
and the ShardedOptimizer's gather sends it to the other ranks as before.

Supported: ``torch.optim.AdamW``, ``torch.optim.Adam`` without weight decay, and memopt's
full-rank ``AdamW``. Low-rank optimizers (GaLore, APOLLO, ...) and other optimizers raise
``NotImplementedError`` before anything is allocated.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.offload.optimizer import OffloadConfig, OffloadedAdamW

__all__ = ["check_offloadable", "offload_inner"]

_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def check_offloadable(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``NotImplementedError`` unless ``optimizer`` is an AdamW the offload path runs."""
    name = type(optimizer).__name__
    is_low_rank = getattr(optimizer, "is_low_rank", None)
    if callable(is_low_rank) and any(is_low_rank(g) for g in optimizer.param_groups):
        raise NotImplementedError(
            f"memopt.shard(offload=...): {name} has low-rank parameter groups; offloading the "
            "state of low-rank optimizers (GaLore, APOLLO, FRUGAL, ...) is not implemented "
            "yet. Use offload=None, or torch.optim.AdamW / memopt.optim.AdamW"
        )
    torch_adamw = isinstance(optimizer, torch.optim.AdamW)
    torch_adam = type(optimizer) is torch.optim.Adam
    memopt_adamw = name == "AdamW" and hasattr(optimizer, "plain_adam_mode")
    if not (torch_adamw or torch_adam or memopt_adamw):
        raise NotImplementedError(
            f"memopt.shard(offload=...): offloaded optimizer state is implemented for AdamW "
            f"(torch.optim.AdamW, memopt.optim.AdamW), got {name}"
        )
    for i, group in enumerate(optimizer.param_groups):
        flags = [k for k in _UNSUPPORTED_FLAGS if group.get(k)]
        if flags:
            raise NotImplementedError(
                f"memopt.shard(offload=...): param group {i} sets {flags}; the offloaded "
                "AdamW step does not implement them"
            )
        if torch_adam and not group.get("decoupled_weight_decay") and group["weight_decay"]:
            raise NotImplementedError(
                f"memopt.shard(offload=...): torch.optim.Adam with weight_decay="
                f"{group['weight_decay']} (L2 in the gradient) is not AdamW; use "
                "torch.optim.AdamW"
            )


def offload_inner(inner: torch.optim.Optimizer, config: OffloadConfig, rank: int) -> OffloadedAdamW:
    """An ``OffloadedAdamW`` over ``inner``'s groups (params and hyperparameters)."""
    check_offloadable(inner)
    groups: list[dict[str, Any]] = []
    for g in inner.param_groups:
        groups.append(
            {
                "params": list(g["params"]),
                "lr": g["lr"],
                "betas": tuple(g["betas"]),
                "eps": g["eps"],
                "weight_decay": g["weight_decay"],
            }
        )
    tier = config.make_tier(rank)
    opt = OffloadedAdamW(groups, offload=config, tier=tier)
    opt._owns_tier = True  # made here for this optimizer: closed with it
    return opt
