"""What a snapshot holds, captured at ``save`` time: mostly by reference, small state by copy.

``capture_all(...)`` returns the tensors this rank writes (``Entry``: the tensor, its global
shape and row offset) and this rank's JSON skeleton (non-tensor state with tensors replaced
by names): model parameters and buffers, optimizer state (``optimizer.state_dict()``, tensors
classified by ``layout.state_kind``), the LR scheduler's ``state_dict()``, user extras and the
RNG states (torch CPU, every CUDA device, numpy, python ``random``). DTensors (an FSDP2
model's, and a torch optimizer's state on them) are taken as this rank's ``Shard(0)`` rows:
only plain tensors reach the copy.

Parameters and optimizer state are the live tensors: the background copy must finish before
the next optimizer step changes them (the checkpointer's fence). Everything the next forward
or the loop may change in place *before* that step is copied here, on the training thread
(on CUDA the copy is queued on the current stream, before the next forward's kernels):
model buffers (BatchNorm's running statistics and batch count change in every training
forward), and the small tensors (``SMALL_COPY`` bytes or less each) of the scheduler, the
extras and the optimizer's ``param_groups`` (a tensor ``lr``). Buffers and those tensors are
small next to the parameters, so ``save`` stays a few milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from memopt.checkpoint import layout as L
from memopt.checkpoint.codec import encode

# Tensors of the scheduler, extras and param_groups at most this big are copied in ``save``
SMALL_COPY = 1 << 20


@dataclass(frozen=True)
class Entry:
    name: str
    tensor: Tensor  # the live (local) tensor; copied to host in the background
    global_shape: tuple[int, ...]
    row_offset: int


def _entry(name: str, t: Tensor, global_shape: Any, offset: int) -> Entry:
    if L.is_dtensor(t):  # only model and optimizer DTensors are cut into their row shards
        raise TypeError(
            f"AsyncCheckpointer.save: {name!r} is a DTensor; model parameters and optimizer "
            "state are saved as their row shards, but a DTensor in extra= or a scheduler's "
            "state has no layout here: pass its .to_local() shard or its .full_tensor()"
        )
    shape = t.shape if global_shape is None else global_shape
    return Entry(name, t.detach(), tuple(int(s) for s in shape), offset)


def _storage(t: Tensor) -> int | None:
    """The address of ``t``'s storage (a DTensor's shard); None without one (empty, meta, a
    wrapper subclass)."""
    local = getattr(t, "_local_tensor", t)
    try:
        ptr = int(local.untyped_storage().data_ptr()) if local.numel() else 0
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return ptr or None


def _copy_small(t: Tensor) -> Tensor:
    return t.detach().clone() if t.numel() * t.element_size() <= SMALL_COPY else t


def capture_model(model: nn.Module, rank: int) -> tuple[list[Entry], dict[str, Any]]:
    """Parameters by reference; buffers copied now (forward changes some in place: BatchNorm).

    A buffer is a ``state_dict`` entry on a buffer's storage (entries that state_dict hooks
    made, e.g. clones of offloaded parameters, are nobody's live state: not copied)."""
    entries, names = [], []
    buffers = {_storage(b) for b in model.buffers()} - {None}
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint: model state {name!r} is a {type(t).__name__}")
        names.append(name)
        live = _storage(t) in buffers
        if L.is_dtensor(t):
            local = L.dtensor_rows(t)
            if local is not None:
                rows = local[0].detach().clone() if live else local[0]
                entries.append(_entry(f"model.{name}", rows, t.shape, local[1]))
                continue
            t = t.to_local()  # type: ignore[attr-defined]
        if rank == 0:
            entries.append(_entry(f"model.{name}", t.detach().clone() if live else t, t.shape, 0))
    return entries, {"names": names}


def capture_optimizer(
    opt: torch.optim.Optimizer, model: nn.Module | None, rank: int, world: int
) -> tuple[list[Entry], dict[str, Any]]:
    sd = dict(opt.state_dict())
    sd.pop("sharding", None)
    params, sharding = L.optimizer_layout(opt, model, rank, world)
    plain = sharding is None and world > 1  # a plain optimizer under DDP: rank 0 writes...
    entries: list[Entry] = []
    state: dict[str, Any] = {}
    nested: dict[str, Tensor] = {}  # tensors inside non-tensor values: this rank's own copy
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        s, e = p.rows
        replicated = plain and not p.row_sharded  # ...unless FSDP2 shards the parameter
        out: dict[str, Any] = {}
        for key, v in st.items():
            if not isinstance(v, Tensor):
                out[key] = encode(v, nested, f"optim.{idx}.{key}@{rank}")
                continue
            v = L.local_state(v, p, key)
            kind = L.state_kind(key, v, e - s)
            name = f"optim.{idx}.{key}"
            writer = 0 if (p.row_sharded or replicated) else p.writer
            if kind == "local":
                name = f"{name}@{rank}"
                entries.append(_entry(name, v, v.shape, 0))
            elif kind == "rows" and not replicated:
                entries.append(_entry(name, v, (p.global_rows, *v.shape[1:]), s))
            elif rank == writer:
                entries.append(_entry(name, v, v.shape, 0))
            out[key] = {"__tensor__": name, "kind": kind, "rows": [s, e]}
            if not v.is_contiguous():  # e.g. a transposed basis: matmul bits depend on layout
                out[key]["stride"] = list(v.stride())
        state[str(idx)] = out
    # param_groups and other top-level keys: every rank writes its own (small) tensors, a
    # tensor lr or betas, copied now: a scheduler changes the lr in place
    small: dict[str, Tensor] = {}
    groups = encode(sd["param_groups"], small, "optim.param_groups")
    other = {
        k: encode(v, small, f"optim.other.{k}")
        for k, v in sd.items()
        if k not in ("state", "param_groups")
    }
    entries += [_entry(n, t, t.shape, 0) for n, t in nested.items()]
    entries += [_entry(n, _copy_small(t), t.shape, 0) for n, t in small.items()]
    skel = {
        "state": state,
        "param_groups": groups,
        "sharding": sharding,
        "params": [
            {
                "index": p.index,
                "name": p.name,
                "shape": list(p.shape),
                "rows": list(p.rows),
                "held": p.held,
                "row_sharded": p.row_sharded,
            }
            for p in params
        ],
        "other": other,
    }
    return entries, skel


def capture_all(
    model: Any, optimizer: Any, scheduler: Any, extra: Any, rank: int, world: int, rng: bool
) -> tuple[list[Entry], dict[str, Any]]:
    """Everything one ``save()`` snapshots: the entries to copy and this rank's skeleton."""
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"AsyncCheckpointer.save: extra must be a mapping (a dict of names "
                        f"to values), got {type(extra).__name__}")  # fmt: skip
    entries: list[Entry] = []
    skel: dict[str, Any] = {"rank": rank, "world_size": world}
    if model is not None:
        e, skel["model"] = capture_model(model, rank)
        entries += e
    if optimizer is not None:
        e, skel["optimizer"] = capture_optimizer(optimizer, model, rank, world)
        entries += e
    for key, obj in (
        ("scheduler", None if scheduler is None else scheduler.state_dict()),
        ("extra", dict(extra or {})),
    ):
        e, skel[key] = capture_plain(obj, key)
        entries += e
    skel["rng"] = None
    if rng:
        e, skel["rng"] = capture_rng()
        entries += e
    return entries, skel


def capture_plain(obj: Any, prefix: str) -> tuple[list[Entry], Any]:
    """A scheduler state_dict or user extras: tensors (if any) plus JSON. Small tensors are
    copied now (the loop may change them in place before the next step), bigger ones (an EMA
    model's weights) are taken by reference, like parameters."""
    tensors: dict[str, Tensor] = {}
    skel = encode(obj, tensors, prefix)
    return [_entry(n, _copy_small(t), t.shape, 0) for n, t in tensors.items()], skel


def capture_rng() -> tuple[list[Entry], dict[str, Any]]:
    entries = [_entry("rng.torch", torch.get_rng_state(), None, 0)]
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            entries.append(_entry(f"rng.cuda.{i}", s, None, 0))
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    entries.append(_entry("rng.numpy", torch.from_numpy(np.asarray(keys, dtype=np.int64)), None, 0))
    skel = {
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": encode(random.getstate(), {}, "rng.python"),
    }
    return entries, skel
