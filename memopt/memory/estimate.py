"""``estimate``: predicted peak bytes per tier for one training configuration, before a run.

The model is only described (meta device); the figures per rank are:

- parameters: their bytes in ``param_dtype``, frozen ones included (they get no gradient
  and no optimizer state; a model with nothing to train is an error); stage 3 keeps FSDP2's
  row shard of every parameter plus the gathered units as temporaries (on one rank too when
  ``offload_params`` runs FSDP2: ``stage3_offload.gathered_units``): the root unit
  (parameters outside the repeated blocks) and two of the largest block (the one in use and
  the prefetched next); at a moment in the head or the loss's backward, before any block's
  own, the root alone on one rank (two blocks kept as a bound on several: ``find_units``),
  and the forward/backward figure is the larger of that moment and the rest;
- gradients: one per parameter in ``param_dtype``; stage 2 with ``dim0`` keeps this rank's
  rows and owned tensors plus the in-flight buckets, stage 3 FSDP2's shards; stages 1/2
  with ``whole_tensor`` keep them all (memopt packs every gradient into its bucket and holds
  the buckets until the step); ``sharding`` mirrors ``memopt.sharding``'s placement;
- optimizer state: the per-optimizer rules of ``optstate`` for this rank's share, plus a
  master copy of the shard when ``master_dtype`` is wider than the parameters (``masters``:
  under FSDP2 the trainable shards are the masters, frozen ones keep their dtype; the
  step's gradients are master-dtype copies, FSDP2's shards during the backward too), plus
  the 8-/4-bit code tables. With ``offload`` they move to the pinned host tier ("cpu") or
  to disk ("nvme"): fp32 AdamW through its pipeline's three staging buffers in pinned host
  memory, any other optimizer's own state tensor by tensor through bounce blocks of up to
  three writes in flight (``offload_state``; tensors under 4 KiB stay in memory); at
  stage 3 ``offload`` and ``offload_params`` place them as ``stage3_offload`` describes;
- activations and the backward's temporaries: the meta trace of ``trace`` (``keep``,
  ``recompute``), or of ``swaptrace`` (``swap``: ``memopt.activations``' swap and prefetch
  schedule played on meta; the device figure is at its peak moment, pinned host its peak);
- the peak is the larger of two moments: forward/backward (activations + temporaries +
  gradients as they appear; with ``grad_accum`` > 1 every gradient is already live while
  the later micro-batches run, unsharded under ``no_sync``) and the optimizer step (all
  gradients + the step's working tensors of ``step``); at stage 3 with offload each moment
  has its own resident shards, state and bounce arena (``stage3_offload``), the arena
  counted with its moment on a CPU run;
- the pinned tier is the bytes requested; where they sit in memopt's shared pinned arena
  (swapped activations, offload at stages 0-2) a note gives the whole chunks it maps.

``EstimateConfig`` (``estimate_config``) validates every field on construction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import nn

from memopt.memory import optstate
from memopt.memory.estimate_config import (
    ARENA_CHUNK_BYTES,
    DEFAULT_BUCKET_BYTES,
    DTYPE_NAMES,
    NVME_STAGING_BYTES,
    EstimateConfig,
    Policy,
)
from memopt.memory.masters import fsdp2, master_bytes
from memopt.memory.model import (
    ParamInfo,
    as_meta_module,
    buffer_bytes,
    check_positions,
    check_target,
    frozen_bytes,
    param_infos,
)
from memopt.memory.offload_state import (
    NVME_CAPACITY_BYTES,
    NVME_GROW_BYTES,
    own_state_offload,
    swap_file_bytes,
)
from memopt.memory.result import CATEGORIES, TIERS, MemoryEstimate, fmt_bytes
from memopt.memory.sharding import ShardShare, shard_share
from memopt.memory.stage3_offload import find_units, gathered_units, place_stage3, unit_sizes
from memopt.memory.step import step_temporaries, table_bytes
from memopt.memory.swaptrace import SwapTrace, trace_swap
from memopt.memory.trace import (
    ActivationTrace,
    causal_lm_inputs,
    check_causal_lm,
    managed_blocks,
    meta_copy,
    meta_inputs,
    trace_step,
)

__all__ = [
    "ARENA_CHUNK_BYTES", "DEFAULT_BUCKET_BYTES", "DTYPE_NAMES", "EstimateConfig", "Policy",
    "assemble", "estimate", "find_units", "unit_sizes",
]  # fmt: skip


def estimate(
    model: Any, *, inputs: dict[str, torch.Tensor] | None = None, **kwargs: Any
) -> MemoryEstimate:
    """Predict peak bytes per tier (see the module docstring) for ``model``.

    ``model``: an ``nn.Module`` (on any device, meta included: it is only described) or a
    ``transformers`` config (built on meta as a causal LM). ``kwargs`` are the fields of
    ``EstimateConfig``. ``inputs``: the forward's keyword tensors (moved to meta; default:
    causal-LM ``input_ids`` and ``labels`` of ``batch_size`` x ``seq_len``).
    """
    cfg = EstimateConfig(**kwargs)
    module = as_meta_module(model, cfg.param_dtype)
    target = cfg.target if cfg.optimizer != "adamw" else None
    infos = param_infos(module, target, cfg.param_dtype)
    if not infos:
        raise ValueError(
            f"memopt.memory.estimate: {type(module).__name__} has no trainable parameters "
            "(none, or all with requires_grad=False): there is nothing to train; pass the "
            "module you train, or unfreeze the parameters it trains"
        )
    check_target(module, target, infos)
    if inputs is None:
        check_causal_lm(module)
        check_positions(module, cfg.seq_len)
    meta = meta_copy(module).to(cfg.param_dtype)
    args = causal_lm_inputs(cfg.batch_size, cfg.seq_len) if inputs is None else meta_inputs(inputs)
    accumulate, recompute = cfg.grad_accum > 1, cfg.activation_policy == "recompute"
    trace: ActivationTrace = (  # swap: its own schedule played on meta (swaptrace)
        trace_swap(meta, args, cuda=cfg.device_kind != "cpu", accumulate=accumulate)
        if cfg.activation_policy == "swap"
        else trace_step(meta, args, recompute=recompute, accumulate=accumulate)
    )
    est = assemble(cfg, module, infos, trace)
    managed = managed_blocks(module)
    if managed:
        est.notes.append(
            f"the model carries memopt.activations policies ({len(managed)} block(s), e.g. "
            f"{managed[0]!r}); the trace ran the modules' own forward: the figures are for "
            f"activation_policy={cfg.activation_policy!r}, not for those policies"
        )
    return est


def assemble(
    cfg: EstimateConfig, module: nn.Module, infos: list[ParamInfo], trace: ActivationTrace
) -> MemoryEstimate:
    """Combine the rules, the sharding share and the trace into a ``MemoryEstimate``."""
    basis = _state_dtype_basis(cfg)  # what the optimizer's tensors are (masters, pipeline)
    state_infos = infos if basis == cfg.param_dtype else param_infos(
        module, cfg.target if cfg.optimizer != "adamw" else None, basis)  # fmt: skip
    master = cfg.master_dtype
    share = shard_share(
        infos, cfg.optimizer, cfg.optimizer_kwargs, cfg.stage, cfg.world_size,
        cfg.resolved_layout, find_units(module, cfg), cfg.bucket_bytes,
        frozen_bytes(module, cfg.param_dtype), state_infos,
        master.itemsize if master is not None and master != cfg.param_dtype else 0,
    )  # fmt: skip
    kw = optstate.resolve(cfg.optimizer, cfg.optimizer_kwargs)
    tiers = {t: dict.fromkeys(CATEGORIES, 0) for t in TIERS}
    dev = tiers["device"]
    base = {
        "parameters": share.params,
        "buffers": buffer_bytes(module, cfg.param_dtype),
    }
    held = {"optimizer_state": share.state, "master_weights": master_bytes(cfg, share.numel)}
    if fsdp2(cfg) and held["master_weights"]:
        # FSDP2's trainable shards are the masters themselves; the frozen ones (the optimizer
        # does not hold them) keep their dtype, as fsdp_dtypes.plan_dtypes leaves them
        base["parameters"] = share.frozen + held["master_weights"]
        held["master_weights"] = 0
    grads, step_base = share.grads, base
    swap_need = 0  # swap-file bytes of the optimizer state's slots (stages 0-2, NVMe)
    arena = {"forward/backward": 0, "optimizer step": 0}
    if cfg.stage == 3 and (cfg.offload or cfg.offload_params):
        placed = place_stage3(cfg, tiers, base, held, grads, unit_sizes(module))
        base, step_base, grads, arena = placed.forward, placed.step, placed.grads, placed.arena
    elif cfg.offload is None:
        base.update(held)
    else:
        swap_need = _offload_state(cfg, tiers, base, held, share, infos, state_infos)
    tables = table_bytes(kw)  # the 8-/4-bit code tables: per process, with the computation
    base = dict(base, optimizer_state=base.get("optimizer_state", 0) + tables)
    step_base = dict(step_base, optimizer_state=step_base.get("optimizer_state", 0) + tables)
    tiers["pinned_host"]["activations"] = _activations(cfg, trace)[1]
    bwd = grads if share.bwd_grads is None else share.bwd_grads  # (stage 3: as placed)
    fwd: dict[str, int] = {}
    for moment in _moments(trace):  # stage 3 gathers by position: the larger total
        now = dict(base, activations=_activations(cfg, moment)[0],
                   gradients=_backward_gradients(cfg, infos, moment, bwd))  # fmt: skip
        gathered = gathered_units(cfg, module, share.gathered, moment.peak_at_head)
        now["temporaries"] = moment.peak_temporaries + gathered
        fwd = max(fwd, now, key=lambda d: sum(d.values()))
    step = dict(step_base, gradients=grads)
    owned = share.numel / max(1, sum(p.numel for p in infos))
    inner = step_temporaries(cfg.optimizer, kw, state_infos, cfg.device_kind, min(1.0, owned))
    # stages 1/2 gather the updated parameters after the inner step; at stage 3 the gathered
    # whole matrices live through it
    step["temporaries"] = max(inner, share.buckets) + share.step_gathered
    phase = _peak_phase(cfg, fwd, step, arena)
    dev.update(fwd if phase == "forward/backward" else step)
    _add_arena(cfg, tiers, arena, phase)
    notes = share.notes + _notes(cfg, trace) + _arena_note(cfg, tiers)
    notes += _swap_file_note(cfg, tiers, swap_need)
    return MemoryEstimate(
        breakdown=tiers, phase=phase, device_kind=cfg.device_kind, world_size=cfg.world_size,
        config=_config_dict(cfg, trace), notes=notes,
    )  # fmt: skip


def _moments(trace: ActivationTrace) -> list[ActivationTrace]:
    """The trace's peak, and its highest points at the head and elsewhere (where stage 3
    holds different units: ``stage3_offload.find_units``)."""
    return [trace] + [
        dataclasses.replace(trace, peak_at_head=head, **cast(dict[str, Any], split))
        for head, split in trace.by_position.items()
    ]


def _backward_gradients(
    cfg: EstimateConfig, infos: list[ParamInfo], trace: ActivationTrace, grads: int
) -> int:
    """Gradients live at the forward/backward peak: as one backward makes them (this rank's
    share of them), or, accumulating, all of them in full (``no_sync`` keeps them unsharded
    until the last micro-batch)."""
    total = sum(p.nbytes for p in infos)
    if cfg.grad_accum > 1:
        return total + trace.peak_gradients
    return int(trace.peak_gradients * grads / max(1, total))


def _peak_phase(
    cfg: EstimateConfig, fwd: dict[str, int], step: dict[str, int], arena: dict[str, int]
) -> str:
    """The moment with more device bytes (on a CPU run, where the stage-3 bounce arena is
    in the same memory, with each moment's arena bytes added)."""
    on_cpu = cfg.device_kind == "cpu"
    f = sum(fwd.values()) + (arena["forward/backward"] if on_cpu else 0)
    s = sum(step.values()) + (arena["optimizer step"] if on_cpu else 0)
    return "forward/backward" if f >= s else "optimizer step"


def _add_arena(
    cfg: EstimateConfig, tiers: dict[str, dict[str, int]], arena: dict[str, int], phase: str
) -> None:
    """The stage-3 parameter swapper's bounce arena on the host tier: the peak moment's on a
    CPU run (one memory), the tier's own peak with a GPU."""
    if cfg.device_kind == "cpu":
        tiers["pageable_host"]["temporaries"] += arena[phase]
    else:
        tiers["pinned_host"]["temporaries"] += max(arena.values())


def _offload_state(
    cfg: EstimateConfig,
    tiers: dict[str, dict[str, int]],
    base: dict[str, int],
    held: dict[str, int],
    share: ShardShare,
    infos: list[ParamInfo],
    state_infos: list[ParamInfo],
) -> int:
    """Stages 0-2 with ``offload``: the state on its tier, NVMe's pinned staging; returns the
    swap-file bytes its slots need (0 on the CPU tier)."""
    where = "pinned_host" if cfg.offload == "cpu" else "disk"
    if _adamw_pipeline(cfg):  # OffloadedAdamW: fp32 masters and moments, 3 staging buffers
        held["master_weights"] = share.numel * 4  # the tier keeps fp32 master weights
        tiers[where].update(held)
        data = sum(held.values())
        if cfg.offload != "nvme":
            return 0
        tiers["pinned_host"]["temporaries"] = min(3 * NVME_STAGING_BYTES, 3 * data)
        return data + min(2 * NVME_STAGING_BYTES, 2 * data)  # + two groups' writes in flight
    # the optimizer's own state, tensor by tensor (StateOffloadedOptimizer); a master stays
    # with the shards, and so do the state tensors too small to move
    base["master_weights"] = held.pop("master_weights")
    own = own_state_offload(
        infos, state_infos, cfg.optimizer, cfg.optimizer_kwargs, cfg.stage, cfg.world_size,
        cfg.resolved_layout, share.rank,
    )  # fmt: skip
    base["optimizer_state"] = own.in_memory
    tiers[where]["optimizer_state"] = own.on_tier
    if cfg.offload != "nvme":
        return 0
    tiers["pinned_host"]["temporaries"] = own.bounce
    return own.file_need


def _swap_file_note(cfg: EstimateConfig, tiers: dict[str, dict[str, int]], need: int) -> list[str]:
    """What the disk column is, and what the optimizer-state swap file takes on the disk."""
    if cfg.offload != "nvme":
        return []
    data = tiers["disk"]["optimizer_state"] + tiers["disk"]["master_weights"]
    need = need or data
    size = swap_file_bytes(need)
    grown = size > NVME_CAPACITY_BYTES
    where = f"at least {fmt_bytes(size)}" if grown else fmt_bytes(size)
    params = ""
    if cfg.offload_params == "nvme":
        params = " (the parameter shards' own file is sized to them plus two units' writes)"
    return [
        f"nvme swap file of the optimizer state: the disk column counts the "
        f"{fmt_bytes(data)} of state its tier holds (as the tier's report and Timeline's disk "
        f"read); the file is preallocated to NVMeConfig.capacity_bytes "
        f"({fmt_bytes(NVME_CAPACITY_BYTES)} by default) when it opens and grows by grow_bytes "
        f"({fmt_bytes(NVME_GROW_BYTES)}) when full: {where} on disk with the defaults{params}"
    ]


def _adamw_pipeline(cfg: EstimateConfig) -> bool:
    """Whether offload= runs the fp32 AdamW pipeline (fp32 masters and moments on the tier)
    rather than keeping the optimizer's own state there (low-rank optimizers, 8/4-bit)."""
    return cfg.optimizer == "adamw" and cfg.optimizer_kwargs.get("state_dtype") not in (
        "int8", "int4")  # fmt: skip


def _state_dtype_basis(cfg: EstimateConfig) -> torch.dtype:
    """The dtype of the tensors the optimizer steps: fp32 in the offload AdamW pipeline, the
    master dtype when masters are kept, else the parameters'."""
    if cfg.offload is not None and cfg.stage != 3 and _adamw_pipeline(cfg):
        return torch.float32
    master = cfg.master_dtype
    if master is not None and master.itemsize > cfg.param_dtype.itemsize:
        return master
    return cfg.param_dtype


def _activations(cfg: EstimateConfig, trace: ActivationTrace) -> tuple[int, int]:
    """(device, pinned host) bytes of activations: on the device at the forward/backward
    peak; on the host tier its own peak (swap: ``swaptrace``, the device bytes at the peak
    moment of the swapped run, i.e. only the blocks fetched back then)."""
    if isinstance(trace, SwapTrace):
        return trace.peak_activations, trace.pinned_peak
    return trace.peak_activations, 0


def _arena_note(cfg: EstimateConfig, tiers: dict[str, dict[str, int]]) -> list[str]:
    """Swapped activations and stage 0-2 offload sit in memopt's shared pinned arena, which
    maps (and pins, or mlocks on a CPU-only build) whole chunks: the figure is the bytes
    requested (as the arena's ``requested_bytes``); the chunks reserved are said beside it."""
    pinned = tiers["pinned_host"]
    used = pinned["activations"]
    if cfg.offload is not None and cfg.stage != 3:
        used = sum(pinned.values())
    if not used:
        return []
    chunks = -(-used // ARENA_CHUNK_BYTES)
    return [
        f"pinned arena: pinned_host counts the bytes requested; memopt's shared PinnedArena "
        f"maps whole {fmt_bytes(ARENA_CHUNK_BYTES)} chunks and pins them (mlock on a CPU-only "
        f"build), which makes them resident whole: it reserves {chunks} chunk(s) = "
        f"{fmt_bytes(chunks * ARENA_CHUNK_BYTES)} of host RAM for them, not in the totals"
    ]


def _notes(cfg: EstimateConfig, trace: ActivationTrace) -> list[str]:
    notes = []
    if cfg.activation_policy != "keep" and not trace.block_saved:
        notes.append(
            f"activation_policy={cfg.activation_policy!r}: the model has no repeated blocks "
            "(an nn.ModuleList of one class), so the policy applies to nothing: figures as keep"
        )
    if cfg.offload == "nvme" and cfg.stage != 3 and _adamw_pipeline(cfg):
        notes.append(
            "nvme (fp32 AdamW pipeline): pinned host holds its 3 staging buffers, each up to "
            f"{fmt_bytes(NVME_STAGING_BYTES)} of state (OffloadConfig.bucket_bytes)"
        )
    elif cfg.offload == "nvme" and cfg.stage != 3:
        notes.append(
            f"nvme ({cfg.optimizer}'s own state, moved tensor by tensor): state tensors under "
            "4 KiB stay in memory; pinned host is the bounce blocks of up to 3 writes in "
            "flight in the first step (the optimizer's new tensors are not page-aligned; "
            "those read back from the file are, and are written in place): a worst case, "
            "reached when the disk is slower than the updates"
        )
    if cfg.stage == 3 and (cfg.offload or cfg.offload_params):
        notes.append(
            "stage 3 offload: in memory only the units read ahead (forward/backward) or in "
            "the step's pipeline, and a bounce arena of those units (see stage3_offload)"
        )
    if cfg.activation_policy == "swap" and trace.block_saved:
        notes.append(
            "swap: device bytes at the peak moment of the swap schedule (a block's swapped "
            "activations come back when the next block's backward starts, and its own), saves "
            "under 4 KiB stay; pinned_host: every block's swapped bytes"
        )
    if cfg.grad_accum > 1:
        notes.append(
            f"grad_accum={cfg.grad_accum}: micro-batches after the first run with every "
            "gradient live (whole on every rank: the sharded optimizers' no_sync accumulates "
            "unsharded gradients until the last micro-batch)"
        )
    return notes


def _config_dict(cfg: EstimateConfig, trace: ActivationTrace) -> dict[str, Any]:
    out = {k: v for k, v in cfg.__dict__.items() if k != "optimizer_kwargs"}
    out["optimizer_kwargs"] = dict(cfg.optimizer_kwargs)
    for k in ("param_dtype", "master_dtype"):
        out[k] = None if out[k] is None else str(out[k]).replace("torch.", "")
    out["saved_activation_bytes"] = trace.saved_bytes
    return out
