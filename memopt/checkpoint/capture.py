"""What a snapshot holds, captured by reference (no copy) at ``save`` time.

``capture(...)`` returns the tensors this rank writes (``Entry``: the live tensor, its global
shape and row offset) and this rank's JSON skeleton (non-tensor state with tensors replaced
by names): model parameters and buffers, optimizer state (``optimizer.state_dict()``, tensors
classified by ``layout.state_kind``), the LR scheduler's ``state_dict()``, user extras and the
RNG states (torch CPU, every CUDA device, numpy, python ``random``). The tensors are the live
ones: the background copy must finish before the next optimizer step changes them (the
checkpointer's fence).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from memopt.checkpoint import layout as L
from memopt.checkpoint.codec import encode


@dataclass(frozen=True)
class Entry:
    name: str
    tensor: Tensor  # the live (local) tensor; copied to host in the background
    global_shape: tuple[int, ...]
    row_offset: int


def _entry(name: str, t: Tensor, global_shape: Any, offset: int) -> Entry:
    shape = t.shape if global_shape is None else global_shape
    return Entry(name, t.detach(), tuple(int(s) for s in shape), offset)


def capture_model(model: nn.Module, rank: int) -> tuple[list[Entry], dict[str, Any]]:
    entries, names = [], []
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint: model state {name!r} is a {type(t).__name__}")
        names.append(name)
        if L.is_dtensor(t):
            local = L.dtensor_rows(t)
            if local is not None:
                entries.append(_entry(f"model.{name}", local[0], t.shape, local[1]))
                continue
            t = t.to_local()  # type: ignore[attr-defined]
        if rank == 0:
            entries.append(_entry(f"model.{name}", t, t.shape, 0))
    return entries, {"names": names}


def capture_optimizer(
    opt: torch.optim.Optimizer, model: nn.Module | None, rank: int, world: int
) -> tuple[list[Entry], dict[str, Any]]:
    sd = dict(opt.state_dict())
    sd.pop("sharding", None)
    params, sharding = L.optimizer_layout(opt, model, rank, world)
    replicated = sharding is None and world > 1  # a plain optimizer under DDP: rank 0 writes
    entries: list[Entry] = []
    state: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        s, e = p.rows
        out: dict[str, Any] = {}
        for key, v in st.items():
            if not isinstance(v, Tensor):
                out[key] = encode(v, {}, f"optimizer.state.{idx}.{key}")
                continue
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
    groups = encode(sd["param_groups"], {}, "optimizer.param_groups")
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
        "other": {
            k: encode(v, {}, f"optimizer.{k}")
            for k, v in sd.items()
            if k not in ("state", "param_groups")
        },
    }
    return entries, skel


def capture_plain(obj: Any, prefix: str) -> tuple[list[Entry], Any]:
    """A scheduler state_dict or user extras: tensors (if any) plus JSON."""
    tensors: dict[str, Tensor] = {}
    skel = encode(obj, tensors, prefix)
    return [_entry(n, t, t.shape, 0) for n, t in tensors.items()], skel


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
