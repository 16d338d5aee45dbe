"""Stage 3: shard the parameters with PyTorch FSDP2 (``fully_shard``), not a re-implementation.

``apply_fully_shard(model, comm, options, master_dtype)`` calls ``fully_shard`` bottom-up on a
wrapping policy, then on the root, over a 1-D ``DeviceMesh`` built from the process group.
Every parameter becomes an ``nn.Parameter`` holding a ``DTensor`` row shard (``Shard(0)``,
split like ``torch.chunk``: rank r holds rows ``[r c, min((r+1) c, rows))``, ``c =
ceil(rows / W)``, exactly the ``dim0`` layout of stages 1 and 2). FSDP2 owns the communication:

- forward: each group's parameters are all-gathered (one ``all_gather_into_tensor`` per group,
  in ``param_dtype``) just before the group runs, the next group's gather overlapping the
  current compute (implicit prefetch), and freed after it (``reshard_after_forward``);
- backward: gathered again in reverse order; each group's gradients leave by one
  ``reduce_scatter_tensor`` (in ``reduce_dtype``), averaged over the ranks, onto the
  sharded parameters' ``.grad`` (DTensors);
- gradient accumulation: ``set_requires_gradient_sync(False)`` keeps unsharded gradients
  locally until the synchronizing backward.

The wrapping policy (``FSDPOptions.modules``): by default every child that holds parameters
at the top level of a ``ModuleList`` (a transformer's blocks), outermost lists only; then the
root (which collects the remaining parameters: embeddings, the head, final norms). Repeated
modules and parameters shared between units are resolved or refused in ``units`` before
``fully_shard`` runs; ranks running different units raise (``unit_calls``).

Mixed precision: ``options.mp_policy`` (an FSDP2 ``MixedPrecisionPolicy``) is passed through.
Without one, a bf16/fp16 model with ``master_dtype=torch.float32`` becomes
``MixedPrecisionPolicy(param_dtype=<model dtype>, reduce_dtype=float32)`` over fp32 sharded
parameters: each group is cast to the master dtype just before it is sharded, so the sharded
parameters are the fp32 masters and only one group is ever held full-size in fp32. A model
mixing dtypes (bf16 and fp32 layers) gets one policy per unit from that unit's own parameters,
and FSDP2's one-dtype-per-unit limits are checked up front (``fsdp_dtypes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memopt.offload.tier import StorageTier
from memopt.sharding.agree import agree
from memopt.sharding.comm import Comm
from memopt.sharding.config import ShardConfig
from memopt.sharding.fsdp2_internals import handle_unused_grads
from memopt.sharding.fsdp_dtypes import plan_dtypes
from memopt.sharding.fsdp_optim import FSDPOptimizer
from memopt.sharding.meta_init import check_meta, is_meta, materialize, param_names
from memopt.sharding.offload_optim import is_offloadable
from memopt.sharding.param_swap import ParamSwapper, make_param_swapper
from memopt.sharding.units import check_units, default_units, resolve_units

__all__ = [
    "FSDPOptions", "apply_fully_shard", "check_stage3", "check_units", "default_units",
    "offload_masters", "shard_device", "shard_stage3",
]  # fmt: skip


@dataclass(frozen=True)
class FSDPOptions:
    """Stage-3 options passed to FSDP2 (``memopt.shard(..., stage=3, fsdp=FSDPOptions(...))``).

    - ``modules``: the submodules to shard as units (each one all-gathered as a group), in any
      order; ``None`` uses the default policy (children of the outermost ``ModuleList``\\ s).
      The root is always sharded last and takes the parameters left over.
    - ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy`` (None: see ``master_dtype``).
    - ``reshard_after_forward``: FSDP2's option (True frees gathered parameters after each
      group's forward, ZeRO-3; False keeps them until backward, ZeRO-2-like memory).
    - ``init_fn`` / ``init_device``: for a model built on the meta device (see
      ``memopt.sharding.meta_init``): the per-module initializer (default: each module's
      ``reset_parameters()``) and where the shards live (default: the rank's accelerator
      under NCCL, else the CPU).
    """

    modules: Sequence[nn.Module] | None = None
    mp_policy: Any = None
    reshard_after_forward: bool = True
    init_fn: Callable[[nn.Module], None] | None = None
    init_device: torch.device | str | None = None

    def __post_init__(self) -> None:
        if self.modules is not None:
            bad = [type(m).__name__ for m in self.modules if not isinstance(m, nn.Module)]
            if bad:
                raise TypeError(
                    f"memopt.shard: FSDPOptions.modules must hold nn.Module objects, got {bad[:3]}"
                )
        if self.mp_policy is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            if not isinstance(self.mp_policy, MixedPrecisionPolicy):
                raise TypeError(
                    "memopt.shard: FSDPOptions.mp_policy must be a "
                    "torch.distributed.fsdp.MixedPrecisionPolicy, got "
                    f"{type(self.mp_policy).__name__}"
                )
        if not isinstance(self.reshard_after_forward, bool):
            raise TypeError("memopt.shard: FSDPOptions.reshard_after_forward must be a bool")
        if self.init_fn is not None and not callable(self.init_fn):
            raise TypeError("memopt.shard: FSDPOptions.init_fn must be callable(module)")
        if self.init_device is not None:
            device = torch.device(self.init_device)  # raises on a malformed string
            if device.type == "meta":
                raise ValueError("memopt.shard: FSDPOptions.init_device cannot be 'meta'")


def apply_fully_shard(
    model: nn.Module,
    comm: Comm,
    options: FSDPOptions,
    master: torch.dtype | None,
    offload_params: str = "none",
    held: set[int] | None = None,
) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` (units first, then the root); ``held``:
    the ids of the optimizer's parameters (see ``fsdp_dtypes``)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    device = shard_device(model, comm, options)
    mesh = DeviceMesh.from_group(comm.group, device.type)
    units = resolve_units(model, options.modules, warn=False)
    plans = plan_dtypes(model, units, master, options.mp_policy, held or set())
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": options.reshard_after_forward}
    if offload_params == "cpu":
        from torch.distributed.fsdp import CPUOffloadPolicy

        # pinned host shards make the per-unit host-to-device copy asynchronous (CUDA only)
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for plan in plans:  # bottom-up (FSDP2 requires it), the root last
        for p in plan.cast:  # just before its unit is sharded: one unit full-size in fp32
            assert master is not None
            p.data = p.data.to(master)
        extra: dict[str, Any] = {} if plan.policy is None else {"mp_policy": plan.policy}
        if plan.module is model:
            extra["reshard_after_forward"] = False
        fully_shard(plan.module, **{**kwargs, **extra})
    return model


def shard_device(model: nn.Module, comm: Comm, options: FSDPOptions) -> torch.device:
    """Where the shards live: the parameters' device, or for a meta model ``init_device``
    (default: the current accelerator under NCCL, else the CPU)."""
    device = next(model.parameters()).device
    if device.type != "meta":
        return device
    if options.init_device is not None:
        return torch.device(options.init_device)
    return comm.device()


def check_stage3(
    model: nn.Module,
    options: FSDPOptions,
    master: torch.dtype | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Stage-3 input checks (local; run before any collective, see ``setup``; a model that
    is already sharded is refused there, for every stage)."""
    odd = [f"{n} {tuple(p.shape)}" for n, p in model.named_parameters()
           if p.dim() == 0 or p.numel() == 0]  # fmt: skip
    if odd:  # FSDP2 refuses both, after part of the model was already converted
        raise ValueError(
            f"memopt.shard(stage=3): parameters {odd[:3]} are 0-d or empty, which FSDP2's "
            "fully_shard cannot shard; reshape a scalar to (1,) and drop empty ones, or use "
            "stage 1/2 (which take both)"
        )
    units = resolve_units(model, options.modules)  # raises on a shared parameter
    plan_dtypes(model, units, master, options.mp_policy, _held(optimizer))  # raises on a bad mix
    if is_meta(model):
        check_meta(model, options.init_fn)


def offload_masters(
    config: ShardConfig, optimizer: torch.optim.Optimizer, fsdp2: bool, own_state: bool
) -> ShardConfig:
    """Stage 3 on FSDP2 with ``offload=`` for an AdamW-like optimizer (one ``OffloadedAdamW``
    runs at stages 1/2 and on the one-rank plain path) and no ``master_dtype``: imply
    ``master_dtype=torch.float32`` when the optimizer holds parameters narrower than fp32,
    so the fp32 sharded parameters are the masters there too. Before, a bf16 model trained
    with fp32 masters at stages 1/2 and on one rank, in pure bf16 on 2+ ranks at stage 3."""
    if not fsdp2 or config.offload is None or config.master_dtype is not None or own_state:
        return config
    if not is_offloadable(optimizer):  # FSDP2's state store: no masters on one rank either
        return config
    bits = {
        torch.finfo(p.dtype).bits
        for g in optimizer.param_groups
        for p in g["params"]
        if p.is_floating_point()
    }
    if not bits or min(bits) >= 32 or max(bits) > 32:  # nothing narrower (or fp64: keep it)
        return config
    return dataclasses.replace(config, master_dtype=torch.float32)


def _held(optimizer: torch.optim.Optimizer | None) -> set[int]:
    """The ids of the parameters ``optimizer`` holds (frozen ones included)."""
    groups = optimizer.param_groups if optimizer is not None else []
    return {id(p) for group in groups for p in group["params"]}


def shard_stage3(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ShardConfig,
    comm: Comm,
    options: FSDPOptions,
    state_tier: StorageTier | None = None,
) -> tuple[nn.Module, FSDPOptimizer]:
    """``fully_shard`` the model, then wrap the optimizer around the new DTensor parameters.

    ``fully_shard`` replaces every parameter object; the optimizer's are found again by name.
    A meta-device model is materialized shard by shard right after (``meta_init``); with
    ``offload_params="nvme"`` the shards then go to NVMe (``param_swap``): its file is made
    only now (its size is the shards'), so the ranks agree on it (``agree``) before any
    collective: a directory unusable on one node fails every rank, with the model already
    sharded. On several ranks a parameter with a gradient on some ranks only is reduced as
    zeros elsewhere (``fsdp2_internals.UnusedGrads``). ``state_tier``: ``offload=``'s tier,
    opened by ``setup`` (None: made by ``FSDPOptimizer``).
    """
    order = param_names(model, optimizer)
    meta = is_meta(model)
    device = shard_device(model, comm, options)
    held = _held(optimizer)
    apply_fully_shard(model, comm, options, config.master_dtype, config.offload_params, held)
    if meta:
        materialize(model, device, comm.rank, comm.world, options.init_fn)
    handle_unused_grads(model, comm)
    swapper = _param_swapper(model, config, comm) if config.offload_params == "nvme" else None
    new = dict(model.named_parameters())
    params = [[new[n] for n in group] for group in order]
    sharded = FSDPOptimizer(model, optimizer, config, comm, params, swapper, state_tier)
    if swapper is not None:  # from here on, to_local() of an evicted shard raises
        swapper.guard_evicted()
    return model, sharded


def _param_swapper(model: nn.Module, config: ShardConfig, comm: Comm) -> ParamSwapper:
    """``make_param_swapper``, agreed on by every rank (see ``shard_stage3``)."""
    assert config.param_nvme is not None  # ShardConfig checked it
    swapper, error = None, None
    try:
        swapper = make_param_swapper(model, config.param_nvme, comm.rank)
    except Exception as exc:  # noqa: BLE001 - agreed on below, then raised on every rank
        error = exc
    try:
        what = "could not make their parameter tier (offload_params='nvme'); the model is sharded"
        agree(comm, error, what)
    except BaseException:
        if swapper is not None:
            swapper.close()
        raise
    assert swapper is not None
    return swapper
