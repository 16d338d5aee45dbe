"""Which part of each tensor a rank holds, and which rank writes it.

Every stored tensor is a *row block* of a global tensor: ``global_shape`` and ``row_offset``
(dim 0; other dims whole). The sources of layout:

- model tensors: a DTensor sharded on dim 0 (FSDP2, stage 3) holds ``torch.chunk``'s rows of
  its mesh rank; every other tensor is replicated and rank 0 writes it;
- optimizer state: a sharding optimizer describes itself with ``checkpoint_layout()`` (duck
  typed: ``memopt.shard``'s optimizers have it); a plain optimizer holds every parameter whole
  (replicated over ranks when a process group exists: rank 0 writes), except a DTensor
  parameter (a torch optimizer on a model the user sharded with ``fully_shard``): the rows of
  its ``Shard(0)`` local shard, whose DTensor state is saved as those rows (``local_state``)
  and wrapped back into DTensors like the parameter on load (``like_param``).

Per-parameter optimizer state is classified by ``state_kind`` against the parameter's held
rows: ``rows`` (dim 0 follows the parameter's rows: moments, projected moments of a
right-sided projection, the fp32 ``master`` weights of ``memopt.shard(master_dtype=...)`` or
``OffloadedAdamW``, which stay parameter-shaped beside a low-rank optimizer's projected
moments), ``global`` (0-d tensors, ``proj_*`` projector state such as a basis
from the SVD of the whole matrix: the same on every holder) and ``local`` (block-quantized
codes ``*_q``/``*_absmax``: their blocks straddle rows, so they load only into the same rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamLayout:
    """One optimizer parameter: global shape, the rows this rank holds, its owner."""

    index: int
    name: str
    shape: tuple[int, ...]
    rows: tuple[int, int]  # held rows [start, end) of dim 0
    held: bool  # this rank holds (and steps) the parameter
    row_sharded: bool  # split over every rank (else held whole by ``writer``)
    writer: int  # the rank that writes this parameter's global state
    master: bool = False  # the optimizer keeps a master copy it loads from state ``master``

    @property
    def global_rows(self) -> int:
        return self.shape[0] if self.shape else 1


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements") and hasattr(t, "device_mesh")


def dtensor_rows(t: Any) -> tuple[Tensor, int] | None:
    """(local tensor, row offset) of a DTensor sharded on dim 0; None when replicated."""
    places = tuple(t.placements)
    if len(places) != 1:
        raise NotImplementedError(
            f"checkpoint: DTensor with placements {places} (a multi-dimensional mesh) is not "
            "supported; only 1-D meshes (FSDP2 Shard(0) or Replicate)"
        )
    place = places[0]
    if place.is_replicate():
        return None
    if not place.is_shard(0):
        raise NotImplementedError(f"checkpoint: DTensor placement {place} (only Shard(0))")
    mesh = t.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    rows = int(t.shape[0])
    chunk = -(-rows // world)
    return t.to_local(), min(rank * chunk, rows)


def optimizer_layout(
    opt: torch.optim.Optimizer, model: nn.Module | None, rank: int, world: int
) -> tuple[list[ParamLayout], dict[str, Any] | None]:
    """The layout of ``opt``'s parameters (positions over all groups) and its sharding meta."""
    describe = getattr(opt, "checkpoint_layout", None)
    if describe is not None:
        info = describe()
        out = [
            ParamLayout(
                int(p["index"]),
                str(p["name"]),
                tuple(int(s) for s in p["shape"]),
                (int(p["rows"][0]), int(p["rows"][1])),
                bool(p["held"]),
                p["owner"] is None and int(info["world_size"]) > 1,
                0 if p["owner"] is None else int(p["owner"]),
                bool(p.get("master", False)),
            )
            for p in info["params"]
        ]
        return out, dict(info["sharding"])
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    out = []
    for index, p in enumerate(plain_params(opt)):
        shape = tuple(int(s) for s in p.shape)
        name = names.get(id(p), f"param.{index}")
        span, sharded = (0, shape[0] if shape else 1), False
        if is_dtensor(p):  # FSDP2 without memopt.shard: this rank holds its shard's rows
            try:
                local = dtensor_rows(p)
            except NotImplementedError as e:
                raise NotImplementedError(f"{e} (optimizer parameter {name})") from None
            if local is not None:
                span, sharded = (local[1], local[1] + int(local[0].shape[0])), True
        out.append(ParamLayout(index, name, shape, span, True, sharded, 0))
    return out, None


def plain_params(opt: torch.optim.Optimizer) -> list[Tensor]:
    """A plain optimizer's parameters, by position over all groups (its state_dict's keys)."""
    return [p for group in opt.param_groups for p in group["params"]]


def local_state(v: Tensor, p: ParamLayout, key: str) -> Tensor:
    """Optimizer state ``v`` as a plain tensor: a DTensor (a torch optimizer's state on FSDP2
    parameters) gives its local rows, which must be the parameter's own, or its local whole
    when replicated. The native copy must never see a DTensor (it has no storage of its own)."""
    if not is_dtensor(v):
        return v
    try:
        local = dtensor_rows(v)
    except NotImplementedError as e:
        raise NotImplementedError(f"{e} (optimizer state {key!r} of {p.name})") from None
    if local is None:
        return v.to_local()  # type: ignore[attr-defined]
    rows, off = local
    if (off, off + int(rows.shape[0])) != p.rows:
        raise NotImplementedError(
            f"checkpoint: optimizer state {key!r} of parameter {p.name} is a DTensor holding "
            f"rows [{off}, {off + int(rows.shape[0])}) on this rank, but the parameter holds "
            f"rows {list(p.rows)}: state sharded unlike its parameter cannot be saved; use "
            "memopt.shard(model, opt, stage=3) or torch.distributed.checkpoint (DCP)"
        )
    return rows


def like_param(v: Any, p: Tensor) -> Any:
    """Loaded state ``v`` for a plain optimizer's DTensor parameter ``p``: a tensor shaped like
    ``p``'s local shard becomes a DTensor like ``p`` (torch's optimizers keep their moments as
    DTensors on DTensor parameters); anything else (a 0-d ``step``) stays as it is."""
    local = p.to_local()  # type: ignore[attr-defined]
    if not isinstance(v, Tensor) or v.dim() == 0 or v.shape != local.shape:
        return v
    from torch.distributed.tensor import DTensor  # p is a DTensor: the module is there

    return DTensor.from_local(
        v.to(local.device), p.device_mesh, p.placements,  # type: ignore[attr-defined]
        run_check=False, shape=p.shape, stride=p.stride(),
    )  # fmt: skip


def state_kind(key: str, t: Tensor, held_rows: int) -> str:
    """``rows`` / ``global`` / ``local`` (see the module docstring)."""
    if key.endswith(("_q", "_absmax")):
        return "local"
    if t.dim() == 0 or key.startswith("proj_"):
        return "global"
    if int(t.shape[0]) == held_rows:
        return "rows"
    return "global"
