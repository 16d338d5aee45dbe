"""Optimizer-state offload under ZeRO 1/2: swap the sharded optimizer's inner AdamW for an
``OffloadedAdamW`` whose fp32 master weights and moments live on a tier.

``ShardedOptimizer`` first places every parameter (its local tensors are views of the model's
own parameters: ``master_dtype`` is not used for them, since the fp32 master lives on the
tier); then ``offload_inner`` builds an ``OffloadedAdamW`` over the same param group dicts (the
objects themselves, so a scheduler made on the optimizer before sharding still sets the LR the
step uses) and makes it the inner optimizer. Each step the owned shards'
state streams through the pipeline (see ``memopt.offload.pipeline``), the update is written
straight into the model's parameter shard (bf16/fp16 through the kernel's fused copy-back),
and the ShardedOptimizer's gather sends it to the other ranks as before.

Supported: ``torch.optim.AdamW``, ``torch.optim.Adam`` without weight decay, and memopt's
full-rank ``AdamW``.

Low-rank memopt optimizers (GaLore, APOLLO, APOLLO-Mini, FRUGAL, Natural GaLore; any optimizer
with low-rank groups and a ``step_one``), and memopt's ``AdamW`` with quantized moments
(``state_dtype="int8"`` / ``"int4"``, whose fp32 pipeline would silently keep fp32 moments:
4x the bytes asked for, and other arithmetic) take the other path, ``state_inner``: their own state
tensors (moments, bases, 8-bit codes and scales) go to the tier through a
``StateOffloadedOptimizer`` that streams them one parameter at a time around ``step_one``; the
parameters (and fp32 masters, with ``master_dtype``) stay where the ShardedOptimizer keeps
them. Other optimizers raise ``NotImplementedError`` before anything is allocated.
"""

from __future__ import annotations

import torch

from memopt.offload.optimizer import OffloadConfig, OffloadedAdamW, check_adam_group
from memopt.offload.state_offload import StateOffloadedOptimizer
from memopt.offload.tier import StorageTier

__all__ = [
    "check_offloadable",
    "is_low_rank_optimizer",
    "is_offloadable",
    "keeps_own_state",
    "offload_inner",
    "replaced",
    "state_inner",
]

_REPLACES = "_memopt_replaces"  # OffloadedAdamW -> the optimizer whose groups it steps
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def is_low_rank_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """A memopt-style optimizer with low-rank groups that can step one parameter at a time."""
    is_low_rank = getattr(optimizer, "is_low_rank", None)
    return (
        callable(is_low_rank)
        and callable(getattr(optimizer, "step_one", None))
        and any(is_low_rank(g) for g in optimizer.param_groups)
    )


def keeps_own_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether offload keeps ``optimizer``'s own state tensors on the tier (``state_inner``)
    instead of replacing it by the fp32 AdamW pipeline: memopt's low-rank optimizers, and any
    memopt optimizer with quantized moments in some group."""
    if is_low_rank_optimizer(optimizer):
        return True
    return callable(getattr(optimizer, "step_one", None)) and any(
        g.get("state_dtype") in ("int8", "int4") for g in optimizer.param_groups
    )


def check_offloadable(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``NotImplementedError`` unless one of the two offload paths runs ``optimizer``."""
    name = type(optimizer).__name__
    if keeps_own_state(optimizer):
        return
    torch_adamw = isinstance(optimizer, torch.optim.AdamW)
    torch_adam = type(optimizer) is torch.optim.Adam
    memopt_adamw = name == "AdamW" and hasattr(optimizer, "plain_adam_mode")
    if not (torch_adamw or torch_adam or memopt_adamw):
        raise NotImplementedError(
            f"memopt.shard(offload=...): offloaded optimizer state is implemented for AdamW "
            f"(torch.optim.AdamW, memopt.optim.AdamW) and memopt's low-rank optimizers, "
            f"got {name}"
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


def is_offloadable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``check_offloadable`` accepts ``optimizer`` (stages 1/2 and the plain one-rank
    path can offload its state)."""
    try:
        check_offloadable(optimizer)
    except NotImplementedError:
        return False
    return True


def offload_inner(
    inner: torch.optim.Optimizer,
    config: OffloadConfig,
    rank: int,
    tier: StorageTier | None = None,
) -> OffloadedAdamW:
    """An ``OffloadedAdamW`` stepping ``inner``'s own group dicts (params and
    hyperparameters), on ``tier`` (``config.make_tier(rank)`` when None); the optimizer owns
    the tier (closes it).

    The very dict objects, not copies: an LR scheduler (or any code) holding ``inner`` or one
    of its groups, as when a scheduler is made before ``memopt.shard`` or passed through
    ``memopt.integrations.accelerate.prepare``, changes the ``lr`` / ``betas`` / ``eps`` /
    ``weight_decay`` that the next step reads (with copies it changed groups nothing read:
    training ran at the initial LR). The hyperparameters are checked on copies first, so a
    refused group leaves ``inner``'s dicts as they were."""
    check_offloadable(inner)
    groups = inner.param_groups
    for i, g in enumerate(groups):
        check_adam_group(dict(g), f"memopt.shard(offload=...): param group {i}")
    if tier is None:
        tier = config.make_tier(rank)
    # torch's add_param_group keeps each dict (it only sets "params" to a list of the same
    # tensors and fills missing defaults, of which there are none): the groups are shared
    opt = OffloadedAdamW(groups, offload=config, tier=tier)
    opt._owns_tier = True  # made here for this optimizer: closed with it
    opt.__dict__[_REPLACES] = inner
    if any(a is not b for a, b in zip(opt.param_groups, groups, strict=True)):
        opt.close()
        raise RuntimeError(
            "memopt.shard(offload=...): OffloadedAdamW copied the optimizer's param groups, "
            "so an LR scheduler made on it would not reach the step; this torch version's "
            "Optimizer.add_param_group is not supported here (report it)"
        )
    return opt


def replaced(stepping: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The optimizer passed to ``memopt.shard`` that ``stepping`` (the sharded optimizer's
    inner one with ``offload=``) steps in place of: ``offload_inner``'s, or the one a
    ``StateOffloadedOptimizer`` wraps."""
    user = stepping.__dict__.get(_REPLACES)
    if user is None and isinstance(stepping, StateOffloadedOptimizer):
        user = stepping.inner
    return user


def check_no_hybrid(inner: torch.optim.Optimizer, config: OffloadConfig) -> None:
    """``OffloadConfig(hybrid=True)`` with an optimizer that keeps its own state (low-rank, or
    quantized moments) is a ``ValueError``: the hybrid CPU/device split is a schedule of
    ``OffloadedAdamW``'s pipeline groups, which that path (state streamed per parameter) does
    not run."""
    if config.hybrid:
        low_rank = is_low_rank_optimizer(inner)
        kind = "is a low-rank optimizer" if low_rank else "has quantized moments"
        raise ValueError(
            f"memopt.shard(offload=...): OffloadConfig(hybrid=True) (config key "
            f"sharding.hybrid_update) applies to the fp32 AdamW offload pipeline only; "
            f"{type(inner).__name__} {kind}, so it keeps its own state, streamed per "
            f"parameter and stepped where its parameters live. Set hybrid=False "
            f"(sharding.hybrid_update: false), or use optimizer AdamW with fp32 state"
        )


def state_inner(
    inner: torch.optim.Optimizer,
    config: OffloadConfig,
    rank: int,
    tier: StorageTier | None = None,
) -> StateOffloadedOptimizer:
    """``inner`` (a low-rank memopt optimizer) with its state tensors kept on ``tier``
    (``config.make_tier(rank)`` when None; owned: closed with the optimizer).
    ``check_no_hybrid`` has refused ``hybrid=True`` before anything was built."""
    check_no_hybrid(inner, config)
    if tier is None:
        tier = config.make_tier(rank)
    opt = StateOffloadedOptimizer(inner, tier, min_bytes=config.min_state_bytes)
    opt._owns_tier = True
    return opt
