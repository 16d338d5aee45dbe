"""``apply_sharding``: validate the inputs, then wrap the optimizer (``memopt.shard`` calls it).

Every check runs before any collective. Checks that can only fail on some ranks (an optimizer
with state on one rank, parameters on another device), and the opening of ``offload=``'s tier
(a directory read-only, missing or full on one node), are agreed on (``agree``: an all-reduce
of a failure flag, then of the failed ranks' error texts), so every rank raises instead of
the healthy ones hanging in their first collective; the failing rank raises its own error,
the others name it and its message. The tier is opened after the checks pass and closed
again if any rank failed or the wrapping below raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from memopt._utils.wrapped_optim import IN_BACKWARD, marked, run_step_hooks
from memopt.offload.tier import StorageTier
from memopt.sharding import guards
from memopt.sharding.agree import agree
from memopt.sharding.buffers import install_buffer_sync
from memopt.sharding.comm import Comm, world1_collectives
from memopt.sharding.config import ShardConfig
from memopt.sharding.fsdp import (
    FSDPOptions,
    check_stage3,
    offload_masters,
    shard_device,
    shard_stage3,
)
from memopt.sharding.masters import check_held_masters
from memopt.sharding.meta_init import is_meta, materialize, param_names, rebind
from memopt.sharding.offload_optim import (
    check_no_hybrid,
    check_offloadable,
    is_offloadable,
    keeps_own_state,
    offload_inner,
    state_inner,
)
from memopt.sharding.optimizer import ShardedOptimizer


def apply_sharding(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ShardConfig,
    process_group: Any = None,
    fsdp: FSDPOptions | None = None,
) -> tuple[nn.Module, ShardedOptimizer]:
    """Wrap ``optimizer`` in a ``ShardedOptimizer`` over ``process_group`` (stage 3: shard the
    model with FSDP2 and return an ``FSDPOptimizer``), then install DDP's buffer broadcast
    on the model (``buffers``); see memopt.shard."""
    _check_not_in_backward(optimizer)
    if fsdp is not None and config.stage != 3:
        raise ValueError(
            f"memopt.shard: fsdp= options apply to stage 3 only, got stage {config.stage}"
        )
    if fsdp is not None and not isinstance(fsdp, FSDPOptions):
        raise TypeError(f"memopt.shard: fsdp must be a FSDPOptions, got {type(fsdp).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"memopt.shard: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    if isinstance(optimizer, ShardedOptimizer):
        raise ValueError("memopt.shard: this optimizer is already sharded; pass the plain one")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"memopt.shard: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    guards.check_closure_optional(optimizer)  # (LBFGS: the same answer on every rank)
    comm = Comm.resolve(process_group)
    if config.offload_params != "none" and comm.group is None:
        raise ValueError(
            f"memopt.shard: offload_params={config.offload_params!r} runs FSDP2, which needs "
            "torch.distributed initialized; on one device a one-rank group is enough "
            "(torchrun --nproc_per_node 1, or init_process_group with world_size=1)"
        )
    fsdp2 = config.stage == 3 and (comm.world > 1 or _forced(comm, config, optimizer))
    own_state = config.offload is not None and keeps_own_state(optimizer)
    config = offload_masters(config, optimizer, fsdp2, own_state)  # fp32 masters as stages 1/2
    if own_state and config.offload is not None:  # every stage, before hooks or FSDP2 units
        check_no_hybrid(optimizer, config.offload)
    if config.offload is not None and not fsdp2:  # FSDP2 keeps any optimizer's state per unit
        _check_offload(optimizer, config, own_state)
    error: Exception | None = None
    tier: StorageTier | None = None
    try:
        guards.check_not_distributed_tensors(model, config.stage)  # every stage, any world
        _check_local(model, optimizer, comm, config.master_dtype)
        if config.stage == 3:
            check_stage3(model, fsdp or FSDPOptions(), config.master_dtype, optimizer)
        elif is_meta(model):
            raise ValueError(
                f"memopt.shard: the model is on the meta device; only stage 3 materializes a "
                f"meta model shard by shard (got stage {config.stage}): build it on a real "
                "device or use stage=3"
            )
    except (TypeError, ValueError) as exc:
        error = exc
    if error is None and config.offload is not None:
        try:  # before the agreement: a directory unusable on one node fails every rank
            tier = config.offload.make_tier(comm.rank)
        except Exception as exc:  # noqa: BLE001 - agreed on below, then raised on every rank
            error = exc
    try:
        _agree(comm, error, optimizer)
        model, sharded = _wrap(model, optimizer, config, comm, fsdp, fsdp2, own_state, tier)
    except BaseException:
        if tier is not None:  # (closing it again after an optimizer that took it did: no-op)
            with contextlib.suppress(Exception):  # the error that matters is the one raised
                tier.close()
        raise
    install_buffer_sync(model, sharded)
    return model, sharded


def _forced(comm: Comm, config: ShardConfig, optimizer: torch.optim.Optimizer) -> bool:
    """Whether a one-rank group takes the sharded path: asked for the collectives
    (``comm.world1_collectives``), parameter offload (FSDP2's, even on one device), or stage 3
    with ``offload=`` for an optimizer the plain path cannot offload (FSDP2's per-unit state
    store takes any; AdamW and memopt's optimizers keep the faster plain path)."""
    if comm.group is None:
        return False
    if world1_collectives() or config.offload_params != "none":
        return True
    return config.stage == 3 and config.offload is not None and not is_offloadable(optimizer)


def _wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ShardConfig,
    comm: Comm,
    fsdp: FSDPOptions | None,
    fsdp2: bool,
    own_state: bool,
    tier: StorageTier | None,
) -> tuple[nn.Module, ShardedOptimizer]:
    """Build the sharded optimizer (every rank passed its checks; ``tier``: ``offload=``'s,
    already open)."""
    if fsdp2:
        return shard_stage3(model, optimizer, config, comm, fsdp or FSDPOptions(), tier)
    if is_meta(model):  # stage 3 on one rank: the whole model is this rank's shard
        options = fsdp or FSDPOptions()
        names = param_names(model, optimizer)
        materialize(model, shard_device(model, comm, options), 0, 1, options.init_fn)
        rebind(model, optimizer, names)
    if config.offload is None:
        return model, ShardedOptimizer(model, optimizer, config, comm)
    if own_state:  # the state goes to the tier; parameters / masters stay with the shards
        sharded = ShardedOptimizer(model, optimizer, config, comm)
        sharded.inner = state_inner(sharded.inner, config.offload, comm.rank, tier)
        _forward_step_hooks(sharded.inner, optimizer)
        return model, sharded
    # Offload: local tensors are the model's own (shards of) parameters; the fp32 master
    # weights and the moments live on the tier, in the inner OffloadedAdamW.
    sharded = ShardedOptimizer(
        model, optimizer, dataclasses.replace(config, master_dtype=None), comm
    )
    sharded.inner = offload_inner(sharded.inner, config.offload, comm.rank, tier)
    _forward_step_hooks(sharded.inner, optimizer)
    sharded.defaults = sharded.inner.defaults
    sharded.config = config
    return model, sharded


def _forward_step_hooks(stepping: torch.optim.Optimizer, user: torch.optim.Optimizer) -> None:
    """With ``offload=`` at stages 1/2 another optimizer steps in place of ``user`` (an
    ``OffloadedAdamW`` over its groups, or a ``StateOffloadedOptimizer`` calling its
    ``step_one``), so ``user.step()`` never runs: its own step hooks (registered before
    ``memopt.shard``, as accelerate does, or an ``AsyncCheckpointer`` that saved it first and
    fences its copy in a pre-hook) run from ``stepping``'s, at the same points of the step
    as without offload. Looked up at each step: hooks added to ``user`` later run too."""
    stepping.register_step_pre_hook(lambda _opt, _args, _kwargs: run_step_hooks(user, "pre"))
    stepping.register_step_post_hook(lambda _opt, _args, _kwargs: run_step_hooks(user, "post"))


def _check_not_in_backward(optimizer: torch.optim.Optimizer) -> None:
    if marked(optimizer, IN_BACKWARD):
        raise ValueError(
            "memopt.shard: this optimizer runs inside the backward (memopt.optim."
            "step_in_backward), where each parameter is updated from the local gradient before "
            "any reduction across ranks, and the sharded optimizer's tiers and shards are never "
            "used; remove() the step_in_backward handle first, or train without sharding"
        )


def _check_offload(optimizer: torch.optim.Optimizer, config: ShardConfig, own_state: bool) -> None:
    try:
        check_offloadable(optimizer)  # the same answer on every rank: no agreement needed
    except NotImplementedError as e:
        if config.stage != 3:
            raise
        raise NotImplementedError(
            f"{e}. At stage 3 any optimizer's state can be offloaded per FSDP2 unit, but "
            "without a process group stage 3 runs the plain one-rank path, which has only "
            "the optimizers above; initialize torch.distributed (a one-rank group is "
            "enough: torchrun --nproc_per_node 1, or init_process_group with world_size=1), "
            "and memopt.shard takes FSDP2's path for this optimizer"
        ) from e
    if not own_state and config.master_dtype not in (None, torch.float32):
        raise ValueError(
            f"memopt.shard: with offload= the master weights are fp32 on the tier; "
            f"master_dtype={config.master_dtype} is not possible (use None or float32)"
        )


def _check_local(
    model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm, master: torch.dtype | None
) -> None:
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(
            "memopt.shard: the optimizer already has state (it has stepped, or a state_dict "
            "was loaded); create it, call memopt.shard, then step, and load checkpoints into "
            "the sharded optimizer"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ValueError("memopt.shard: the optimizer has no parameters")
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [tuple(p.shape) for p in params if id(p) not in names]
    if missing:
        raise ValueError(
            f"memopt.shard: {len(missing)} optimizer parameter(s) (shapes {missing[:3]}) are not "
            "parameters of the model; build the optimizer from model.parameters()"
        )
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        by_dev = {d: [names[id(p)] for p in params if str(p.device) == d][:2] for d in devices}
        raise ValueError(
            f"memopt.shard: parameters are on several devices {by_dev}; move the model to one "
            "device (model.to(device)) before sharding"
        )
    bad = [names[id(p)] for p in params if not p.is_contiguous() or p.is_sparse]
    if bad:
        raise ValueError(
            f"memopt.shard: parameters {bad[:3]} are not dense contiguous tensors; make them "
            "contiguous (p.data = p.data.contiguous()) before sharding"
        )
    ids = {id(p) for p in params}
    sparse = [
        n or type(m).__name__ for n, m in model.named_modules()
        if getattr(m, "sparse", False) is True and id(getattr(m, "weight", None)) in ids
    ]  # fmt: skip
    if sparse:
        raise ValueError(
            f"memopt.shard: {sparse[:3]} produce sparse gradients (sparse=True), which the "
            "sharded reduction cannot bucket; build them with sparse=False"
        )
    if comm.backend() == "nccl" and params[0].device.type == "cpu":
        raise ValueError(
            "memopt.shard: the process group uses NCCL but the parameters are on the CPU; "
            "move the model to the rank's GPU or use a gloo group"
        )
    # a master must be wider than its parameter, at every stage (masters.py); checked here,
    # before ShardedOptimizer replaces anything in the optimizer's groups
    check_held_masters(model, optimizer, master)


def _agree(comm: Comm, error: Exception | None, optimizer: torch.optim.Optimizer) -> None:
    """Raise on every rank if any rank failed its checks or could not open its tier."""
    device = optimizer.param_groups[0]["params"][0].device if error is None else None
    if device is not None and device.type == "meta":
        device = None
    what = "failed their input checks or could not open their tier; no collective was issued"
    agree(comm, error, what, device=device)
