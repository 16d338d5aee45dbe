"""Profile one training step per block: bytes saved for backward, compute times, copy speed.

``profile(model, batch)`` runs ``warmup`` plain forward+backward steps, then ``repeats``
instrumented ones, and returns a ``Profile``:

- **bytes**: a ``saved_tensors_hooks`` pair sees every tensor autograd saves. Tensors whose
  storage is a parameter or buffer (``Linear`` saves its weight) are skipped; the rest are
  counted once per storage (views and duplicate saves share a count) in a ``SavedLedger``,
  whose device peak is the unmanaged peak. Each storage is attributed to the block whose
  forward was running when it was saved (forward pre/post hooks keep the current block). A
  storage several blocks save (rotary tables) counts in each of them, as the managers' ledger
  (keyed by block) counts it: a slight over-count of physical memory, never an under-count.
  Storages saved outside every block are *non-block* bytes: no block policy frees them. Of
  those, ``head_saved_bytes`` were saved after the last block's forward (final norm, head,
  loss): autograd frees them before any block's backward starts.
- **times**: a block's forward time is what recomputing it costs; its backward time runs
  from the gradient of its output (a hook on the output) to the gradient of its input (a
  hook on the input). On CUDA the marks are events, read after one synchronize; on CPU
  ``perf_counter``. The per-block minimum over the repeats is kept, then blocks of identical
  shape (same saved/input bytes and linear layers) share the median of their times: identical
  blocks cost the same, and one noisy reading on a busy host should not steer the planner.
  ``head_forward_s``/``head_backward_s`` are the compute after the last block (norm, head,
  loss) and before its backward: what can hide the last block's swap.
- **heavy ops** (``ops=True``): one more step under a ``TorchDispatchMode`` times the matmuls
  and attention kernels inside each block's forward and records their output bytes: a
  selective recompute keeps those outputs and recomputes only the cheap rest.
- **copy bandwidth** (``measure_copy_bandwidth``): on CUDA pinned host <-> device copies timed
  with events; on CPU a memcpy into memory of a ``PinnedArena`` (the swap target).

Gradients the model held before profiling are restored afterwards; parameters are unchanged.
A model with blocks still managed by ``apply`` is refused (their hooks would hide their saves
from the profile): ``remove()`` the manager first.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from memopt.activations._calls import CallProfile, call_profiles
from memopt.activations._probe import (
    NONBLOCK,
    Clock,
    LossFn,
    OpRecord,
    Record,
    instrumented_step,
    op_step,
)
from memopt.activations.blocks import BlockSpec, find_blocks
from memopt.activations.hooks import managed_block, persistent_buffers
from memopt.activations.tokensplit import split_parts
from memopt.offload.arena import ArenaConfig, PinnedArena

__all__ = ["BlockProfile", "Profile", "default_loss", "measure_copy_bandwidth", "profile"]



@dataclass(frozen=True)
class BlockProfile:
    """One block as measured. ``saved_bytes`` includes ``input_bytes`` (the first tensor
    argument) when the block saves its own input (an RMSNorm does); ``linear_input_bytes`` is
    the part of ``saved_bytes`` that feeds ``nn.Linear`` layers (what a sampled linear layer
    shrinks); ``args_bytes`` counts every tensor argument, shared ones (rotary tables) too:
    a checkpointed block keeps them all and the ledger counts them per block."""

    name: str
    saved_bytes: int
    input_bytes: int
    output_bytes: int
    linear_input_bytes: int
    forward_s: float
    backward_s: float
    input_saved: bool = True
    linears: tuple[tuple[int, int, int], ...] = ()  # (in_features, rows, itemsize) per call
    args_bytes: int = 0  # every tensor argument (rotary tables, masks too): a checkpoint's hold
    keep_ops: tuple[str, ...] = ()  # heavy ops run in the forward (what selective AC keeps)
    kept_out_bytes: int = 0  # their outputs: what a selective recompute caches
    kept_saved_bytes: int = 0  # the part of saved_bytes those outputs make up
    kept_fraction: float = 0.0  # their share of the forward time: what selective AC skips
    # distinct inputs of the modules a split runs piece by piece (a split(a) keeps 1 - a of
    # them on the device); None: split refuses this block, or its input has no token dimension
    # at seq_dim 1 (a 2-D [N, features] input: dim 1 is the features)
    split_input_bytes: int | None = None
    # the saved storages below min_swap_bytes: a swap leaves them on the device
    small_saved_bytes: int = 0
    # what a split layer's attention core saves outside the split projections: a split swaps
    # it whole (not alpha of it); 0 for a token-local block
    split_core_bytes: int = 0
    # the split projections' inputs that are views of the core's saves (SDPA's output read
    # by o_proj): the core goes whole and the swapped tokens' piece copies them again
    split_shared_bytes: int = 0


@dataclass(frozen=True)
class Profile:
    """A measured step: per-block figures plus what no block policy changes."""

    blocks: tuple[BlockProfile, ...]
    nonblock_saved_bytes: int
    head_saved_bytes: int
    measured_peak_bytes: int
    step_s: float
    head_forward_s: float
    head_backward_s: float
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    device_type: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    # every grad-enabled block call in forward order; a block called several times per
    # forward makes the planner price call by call (``_calls``); empty: each block once
    calls: tuple[CallProfile, ...] = ()

    @property
    def unmanaged_peak_bytes(self) -> int:
        """Predicted peak with every block kept (matches ``measured_peak_bytes``)."""
        return self.nonblock_saved_bytes + sum(b.saved_bytes for b in self.blocks)

    @property
    def copy_overlaps_compute(self) -> bool:
        """A CUDA copy runs on the copy engine beside compute; a CPU memcpy takes the cores."""
        return self.device_type == "cuda"

    def block(self, name: str) -> BlockProfile:
        for b in self.blocks:
            if b.name == name:
                return b
        names = [b.name for b in self.blocks]
        raise ValueError(f"no block {name!r} in the profile; blocks: {names}")

    def table(self) -> str:
        rows = [("block", "saved MiB", "input MiB", "linear-in MiB", "fwd ms", "bwd ms")]
        for b in self.blocks:
            rows.append((b.name, f"{b.saved_bytes / 2**20:.2f}", f"{b.input_bytes / 2**20:.2f}",
                         f"{b.linear_input_bytes / 2**20:.2f}", f"{b.forward_s * 1e3:.2f}",
                         f"{b.backward_s * 1e3:.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(
            f"non-block {self.nonblock_saved_bytes / 2**20:.2f} MiB; measured peak "
            f"{self.measured_peak_bytes / 2**20:.2f} MiB; step {self.step_s * 1e3:.1f} ms; "
            f"copy d2h {self.d2h_bytes_per_s / 1e9:.2f} GB/s h2d {self.h2d_bytes_per_s / 1e9:.2f} "
            f"GB/s ({self.device_type})"
        )
        return "\n".join(lines)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """HF style: a mapping with ``labels`` -> ``model(**batch).loss``; a tensor (or tuple of
    tensors) -> the mean of the (first) output."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if loss is None:
            raise ValueError("model(**batch) returned no .loss; pass labels in the batch or a "
                             "loss_fn(model, batch) -> loss")
        return loss
    out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "logits", None)
        if out is None:
            raise TypeError("cannot make a loss from the model output; pass loss_fn(model, batch)")
    return out.float().mean()


def measure_copy_bandwidth(device: torch.device, nbytes: int = 32 << 20,
                           repeats: int = 3) -> tuple[float, float]:
    """``(device->host, host->device)`` bytes per second, best of ``repeats``.

    CUDA: copies between device memory and pinned arena memory, timed with events. Other
    devices: a memcpy from a fresh tensor into arena memory and back (on a CPU "device" this
    is the whole cost of a swap: no copy engine, the same cores).
    """
    nbytes = max(int(nbytes), 1 << 20)
    cuda = device.type == "cuda"
    arena = PinnedArena(ArenaConfig(chunk_bytes=0, pin="auto" if cuda else "off"))
    try:
        host = arena.bytes_view(arena.alloc(nbytes))
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dev.fill_(1)
        host.fill_(2)
        clock = Clock(device)
        best_d2h = best_h2d = float("inf")
        for _ in range(repeats):
            clock.sync()
            a = clock.mark()
            host.copy_(dev, non_blocking=cuda)
            b = clock.mark()
            dev.copy_(host, non_blocking=cuda)
            c = clock.mark()
            clock.sync()
            best_d2h = min(best_d2h, clock.seconds(a, b))
            best_h2d = min(best_h2d, clock.seconds(b, c))
        del host
        return nbytes / max(best_d2h, 1e-9), nbytes / max(best_h2d, 1e-9)
    finally:
        arena.close()


def _combine(records: list[Record], blocks: list[tuple[str, nn.Module]], splittable: set[str],
             min_swap_bytes: int) -> tuple[tuple[BlockProfile, ...], int, int]:
    rec = records[-1]  # bytes are the same every step; times: the minimum over the steps
    per_block = {name: 0 for name, _ in blocks}
    linear = {name: 0 for name, _ in blocks}
    small = {name: 0 for name, _ in blocks}
    nonblock = head = 0
    for key, size in rec.sizes.items():
        owners = rec.owners[key] - {NONBLOCK}
        if not owners:
            nonblock += size
            head += size if key in rec.head_keys else 0
        for owner in owners:  # a storage several blocks save counts in each (as the ledger)
            per_block[owner] += size
            linear[owner] += size if key in rec.linear_inputs else 0
            small[owner] += size if size < max(min_swap_bytes, 1) else 0  # (swap's test)
    out = []
    for name, _ in blocks:
        fwd = min((r.secs["fwd"].get(name, float("inf")) for r in records), default=0.0)
        fwd = 0.0 if fwd == float("inf") else fwd
        bwd = min((r.secs["bwd"].get(name, float("inf")) for r in records), default=0.0)
        bwd = 2.0 * fwd if bwd == float("inf") else bwd  # input needs no grad: estimate
        in_key = rec.in_keys.get(name)
        in_saved = in_key is not None and name in rec.owners.get(in_key, ())
        # split's seq_dim (1) must be a token dimension: neither the batch nor the features
        tokens = name in splittable and rec.in_ndim.get(name, 0) >= 3
        split_in = sum(rec.split_inputs.get(name, {}).values()) if tokens else None
        core = sum(rec.sizes[k] for k in rec.core_saved.get(name, ())) if tokens else 0
        shared = sum(n for k, n in rec.split_inputs.get(name, {}).items()
                     if k in rec.core_saved.get(name, ())) if tokens else 0
        out.append(BlockProfile(name, per_block[name], rec.in_bytes.get(name, 0),
                                rec.out_bytes.get(name, 0), linear[name], fwd, bwd, in_saved,
                                tuple(rec.linear_calls.get(name, ())),
                                rec.all_in_bytes.get(name, 0), split_input_bytes=split_in,
                                small_saved_bytes=small[name], split_core_bytes=core,
                                split_shared_bytes=shared))
    return _share_times(out), nonblock, head


def _share_times(blocks: list[BlockProfile]) -> tuple[BlockProfile, ...]:
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, b in enumerate(blocks):
        groups.setdefault((b.saved_bytes, b.input_bytes, b.linears), []).append(i)
    out = list(blocks)
    for idx in groups.values():
        shared = {key: statistics.median(getattr(blocks[i], key) for i in idx)
                  for key in ("forward_s", "backward_s", "kept_fraction")}
        for i in idx:
            out[i] = replace(blocks[i], **shared)
    return tuple(out)


def _with_ops(blocks: tuple[BlockProfile, ...], rec: Record, ops: OpRecord) -> tuple[
        BlockProfile, ...]:
    out = []
    for b in blocks:
        outs = ops.outputs.get(b.name, {})
        saved = sum(size for key, size in outs.items()
                    if key in rec.sizes and b.name in rec.owners.get(key, ()))
        fwd = rec.secs["fwd"].get(b.name, 0.0)  # the block's forward in the same (op) step
        frac = min(ops.seconds.get(b.name, 0.0) / fwd, 1.0) if fwd > 0 else 0.0
        out.append(replace(
            b, keep_ops=tuple(sorted(ops.ops.get(b.name, ()))),
            kept_out_bytes=ops.out_bytes.get(b.name, 0),
            kept_saved_bytes=saved, kept_fraction=frac))
    return _share_times(out)


def _refuse_managed(model: nn.Module) -> None:
    """The managers' saved-tensor hooks are innermost and win over the profiler's: a profile of
    managed blocks would see almost none of their saves and under-state the peak."""
    managed = [name for name, m in model.named_modules() if managed_block(m) is not None]
    if managed:
        shown = ", ".join(repr(n) for n in managed[:4]) + (", ..." if len(managed) > 4 else "")
        raise ValueError(
            f"memopt.activations.profile/plan: {len(managed)} module(s) of the model are managed "
            f"by memopt.activations.apply ({shown}); their hooks would hide their saved "
            "activations from the profile. Call remove() on that manager (or leave its `with` "
            "block) before profiling or planning, then apply the new plan"
        )


def profile(
    model: nn.Module,
    sample_batch: Any,
    loss_fn: LossFn | None = None,
    *,
    blocks: BlockSpec = None,
    warmup: int = 1,
    repeats: int = 2,
    ops: bool = True,
    min_swap_bytes: int = 4096,
) -> Profile:
    """Measure one training step of ``model`` on ``sample_batch`` block by block (see module doc).

    ``loss_fn(model, batch) -> loss`` defaults to ``default_loss``. ``blocks`` overrides the
    block discovery of ``find_blocks``. Runs ``warmup + repeats`` forward+backward passes, and
    with ``ops`` one more under a dispatch mode that times each block's heavy ops (matmuls,
    attention): the figures of a selective recompute. ``min_swap_bytes`` is the
    ``ActivationOptions`` value the plan will be applied with (the saves below it, which a
    swap leaves on the device, are ``BlockProfile.small_saved_bytes``).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"profile needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    _refuse_managed(model)
    stage = getattr(model, "_memopt_sharded_stage", 0)
    if stage >= 2:
        raise ValueError(
            f"memopt.activations.profile/plan: the model is sharded (memopt.shard stage {stage}): "
            "its profiling steps would run the sharded gradient reduction, and stage 3's "
            "parameters have no local storage to measure. Plan on the model before "
            "memopt.shard and apply the plan after it (plans name blocks, which sharding keeps)"
        )
    found = find_blocks(model, blocks)
    parts = {n: sp for n, block in found if (sp := split_parts(block, n)) is not None}
    loss_fn = loss_fn or default_loss
    device = next(model.parameters()).device
    clock = Clock(device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    # the profiling steps leave no trace: gradients, running statistics, RNG streams
    buffers = [(b, b.clone()) for b in persistent_buffers(model)]
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        for _ in range(warmup):
            for p in params:
                p.grad = None
            loss_fn(model, sample_batch).backward()
        records = []
        for _ in range(repeats):
            for p in params:
                p.grad = None
            records.append(instrumented_step(model, sample_batch, loss_fn, found, clock, parts))
        if ops:
            for p in params:
                p.grad = None
            op_rec, op_times = op_step(model, sample_batch, loss_fn, found, clock)
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    block_profiles, nonblock, head = _combine(records, found, set(parts), min_swap_bytes)
    if ops:
        block_profiles = _with_ops(block_profiles, op_rec, op_times)
    biggest = max((b.saved_bytes for b in block_profiles), default=0)
    d2h, h2d = measure_copy_bandwidth(device, min(max(biggest, 16 << 20), 64 << 20))
    return Profile(
        blocks=block_profiles, nonblock_saved_bytes=nonblock, head_saved_bytes=head,
        measured_peak_bytes=records[-1].peak,
        step_s=min(r.secs["step"]["step"] for r in records),
        head_forward_s=min(r.secs["head"]["fwd"] for r in records),
        head_backward_s=min(r.secs["head"]["bwd"] for r in records),
        d2h_bytes_per_s=d2h, h2d_bytes_per_s=h2d, device_type=device.type,
        calls=call_profiles(records[-1], min_swap_bytes),
    )
