"""Loading a snapshot into live objects, resharding as needed.

- model: every entry of ``model.state_dict()`` must be in the snapshot with the same global
  shape (else ``SnapshotMismatchError`` listing the differences); a DTensor row shard gets its
  rows, any other tensor the whole, copied in place. ``check_model`` checks all of it (and
  the placements and stored rows) without writing; ``copy_model`` then copies.
- optimizer: a memopt optimizer must be of the class that saved the state (checked first:
  another optimizer may group, and so order, its parameters differently); the saved
  parameters must have this optimizer's shapes position by position and, where both sides
  name the same set of parameters (wrapper prefixes such as ``module.`` or ``_orig_mod.``
  aside), the same name at each position: a reorder of same-shaped parameters would load
  moments into the wrong one.
  The target layout (``checkpoint_layout()`` or a plain optimizer's) decides which
  parameters this rank holds and which rows; ``rows`` state is cut to those rows, ``global``
  state is taken whole, ``local`` (block-quantized) state loads only into the same rows as it
  was saved from. The rebuilt ``state_dict`` goes through the optimizer's own
  ``load_state_dict`` (with this optimizer's ``sharding`` tag where it has one). Saved fp32
  ``master`` weights (``memopt.shard(master_dtype=...)``, ``OffloadedAdamW``) are ``rows``
  state; they load only where a master is kept (a layout entry ``master``, or an
  ``OffloadedAdamW``) and are dropped elsewhere (a torch optimizer would keep them). A plain
  optimizer on FSDP2 DTensor parameters gets its parameter-shaped state back as DTensors.
- scheduler, extras: this rank's saved JSON (rank 0's when the rank did not exist).
- RNG: this rank's saved states (skipped with a log line when the rank did not exist).

Each part is read (``scheduler_state``, ``rng_state``) apart from being applied, so that
``loading.restore_all`` can read and check everything before it changes anything.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from memopt._utils import get_logger
from memopt._utils.wrapped_optim import WrapperOptimizer
from memopt.checkpoint import layout as L
from memopt.checkpoint.codec import decode
from memopt.checkpoint.derived import MASTER, takes_masters
from memopt.checkpoint.errors import SnapshotMismatchError
from memopt.checkpoint.reader import Snapshot

log = get_logger("memopt.checkpoint")


def _skeleton(snap: Snapshot, rank: int) -> dict[str, Any]:
    return snap.skeletons[rank if rank < snap.world else 0]


def _part(snap: Snapshot, rank: int, key: str) -> Any:
    part = _skeleton(snap, rank).get(key)
    if part is None:
        raise SnapshotMismatchError(
            f"snapshot {snap.path} holds no {key} state (it was saved without {key}=); "
            f"load it without {key}="
        )
    return part


#: What a model restore writes: (destination tensor, snapshot key, row offset of a DTensor
#: row shard, or None for the whole tensor).
ModelPlan = list[tuple[Tensor, str, int | None]]


@torch.no_grad()
def check_model(snap: Snapshot, model: nn.Module) -> ModelPlan:
    """Check that ``snap`` fits ``model`` (names, global shapes, DTensor placements, stored
    rows) and say what ``copy_model`` writes where; nothing is written here."""
    sd = model.state_dict()
    saved = set(_part(snap, 0, "model")["names"])
    missing = sorted(n for n in sd if n not in saved)
    unexpected = sorted(n for n in saved if n not in sd)
    wrong = [
        f"{n}: snapshot {list(snap.shapes[f'model.{n}'])} vs model {list(t.shape)}"
        for n, t in sd.items()
        if n in saved and snap.shapes[f"model.{n}"] != tuple(t.shape)
    ]
    if missing or unexpected or wrong:
        raise SnapshotMismatchError(
            f"snapshot {snap.path} does not fit this model (from another model?): "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, shapes differ {wrong[:8]}"
        )
    plan: ModelPlan = []
    for name, t in sd.items():
        key, off = f"model.{name}", None
        if L.is_dtensor(t):
            local = L.dtensor_rows(t)  # (a multi-dimensional mesh raises here, not mid-copy)
            if local is not None:
                t, off = local
            else:
                t = t.to_local()
        if off is not None:
            _check_stored(snap, key, off, off + int(t.shape[0]))
        elif snap.shapes[key]:
            _check_stored(snap, key, 0, snap.shapes[key][0])
        plan.append((t, key, off))
    return plan


def _check_stored(snap: Snapshot, key: str, start: int, end: int) -> None:
    """``snap.rows(key, start, end)`` will find every row (the sum it checks, before any copy)."""
    covered = sum(
        max(0, min(end, off + int(t.shape[0])) - max(start, off)) for off, _r, t in snap.blocks[key]
    )
    if covered < end - start:
        raise SnapshotMismatchError(
            f"snapshot {snap.path}: rows [{start}, {end}) of {key!r} are not all stored "
            f"(blocks at {[b[0] for b in snap.blocks[key]]}); nothing was loaded"
        )


@torch.no_grad()
def copy_model(snap: Snapshot, plan: ModelPlan) -> None:
    for dst, key, off in plan:
        dst.copy_(snap.full(key) if off is None else snap.rows(key, off, off + int(dst.shape[0])))


def restore_model(snap: Snapshot, model: nn.Module) -> None:
    copy_model(snap, check_model(snap, model))


def optimizer_state_dict(
    snap: Snapshot, opt: torch.optim.Optimizer, model: nn.Module | None, rank: int, world: int
) -> dict[str, Any]:
    """``opt``'s state dict from ``snap``, read and checked (nothing is loaded yet): a
    snapshot the optimizer cannot take fails here, before the model is touched."""
    params, sharding = L.optimizer_layout(opt, model, rank, world)
    ref = _part(snap, 0, "optimizer")
    _check_same_class(snap, ref, opt)
    _check_same_params(snap, ref["params"], params)
    state: dict[int, dict[str, Any]] = {}
    live = L.plain_params(opt) if sharding is None else []
    keep_masters = takes_masters(opt)
    for p in params:
        if p.held:
            st = _param_state(snap, p)
            if st is not None and not (keep_masters or p.master):
                st.pop(MASTER, None)  # no master copy here: would only hold memory (torch's)
            if st is not None and live and L.is_dtensor(live[p.index]):
                st = {k: L.like_param(v, live[p.index]) for k, v in st.items()}  # FSDP2
            if st is not None:
                state[p.index] = st
    own = _owned(snap, 0)  # param_groups and other keys: rank 0's (every rank saves them)
    groups = decode(ref["param_groups"], own)
    if isinstance(groups, list) and len(groups) == len(opt.param_groups):
        groups = [_to_devices(g, now) for g, now in zip(groups, opt.param_groups, strict=True)]
    sd: dict[str, Any] = {"state": state, "param_groups": groups}
    sd.update({k: decode(v, own) for k, v in ref.get("other", {}).items()})
    if sharding is not None:
        sd["sharding"] = sharding
    return sd


def _check_same_class(snap: Snapshot, ref: dict[str, Any], opt: torch.optim.Optimizer) -> None:
    """A memopt optimizer takes only its own class's state (its ``load_state_dict`` refuses
    another's); say so before the parameter layouts are compared, since another optimizer
    may order its parameters differently and the layout check would blame shapes."""
    saved_by = ref.get("other", {}).get("memopt_optimizer")
    here = _memopt_class(opt)
    if isinstance(saved_by, str) and here is not None and saved_by != here:
        raise SnapshotMismatchError(
            f"snapshot {snap.path}: its optimizer state was saved by {saved_by}, this "
            f"optimizer is {here}; load it into the same optimizer (optimizer.name must match "
            "to resume; to take the weights only, load without optimizer=..., or start a new "
            "run with model.init_from); nothing was loaded"
        )


def _memopt_class(opt: torch.optim.Optimizer) -> str | None:
    """The class name a memopt optimizer records in its state dicts (``memopt_optimizer``),
    looking through memopt's wrappers (sharding, state offload); None for other optimizers
    (torch's, ``OffloadedAdamW``), which record and check no class."""
    while isinstance(opt, WrapperOptimizer):
        opt = opt.inner
    if callable(getattr(opt, "check_loaded_group", None)) and hasattr(opt, "check_loaded_shapes"):
        return type(opt).__name__
    return None


#: Module wrappers that put a segment into parameter names: DDP's (and DataParallel's)
#: ``module.`` in front, ``torch.compile``'s ``_orig_mod.``, FSDP1's and activation
#: checkpointing's wrapped-module segments anywhere.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _plain_name(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _check_same_params(
    snap: Snapshot, saved: list[dict[str, Any]], params: list[L.ParamLayout]
) -> None:
    """The saved parameters (by position ``index``) must be this optimizer's: same shapes and,
    when both sides name the same set of parameters, the same one at each position (a
    reorder of same-shaped parameters would load one's moments into another). Names that do
    not form the same set (a model renamed, a wrapper unknown here, no model given to name
    them: ``param.N``) are not compared; shapes still are."""
    old = sorted(saved, key=lambda q: int(q["index"]))
    now = sorted(params, key=lambda p: p.index)
    old_names = [_plain_name(str(q["name"])) for q in old]
    now_names = [_plain_name(p.name) for p in now]
    if old_names != now_names and sorted(old_names) == sorted(now_names):
        diff = [
            f"#{p.index}: snapshot {q['name']} vs here {p.name}"
            for q, p, a, b in zip(old, now, old_names, now_names, strict=True)
            if a != b
        ]
        raise SnapshotMismatchError(
            f"snapshot {snap.path}: the optimizer's parameter order differs from the snapshot's "
            f"(the same {len(now)} parameters in another order: optimizer.name, its target or "
            f"the param groups changed?): {diff[:8]}; build the optimizer with the saved "
            "groups in the saved order to resume, or load without optimizer=... to take the "
            "weights only; nothing was loaded"
        )
    if [tuple(q["shape"]) for q in old] != [p.shape for p in now]:
        by_index = {int(q["index"]): q for q in old}
        diff = [
            f"#{p.index}: snapshot {q.get('name')} {q.get('shape')} vs here {p.name} "
            f"{list(p.shape)}"
            for p in now
            for q in [by_index.get(p.index, {})]
            if tuple(q.get("shape", ())) != p.shape
        ]
        raise SnapshotMismatchError(
            f"snapshot {snap.path}: optimizer parameters differ ({len(old)} saved, "
            f"{len(now)} here): {diff[:8]}"
        )


def _no(name: str) -> Tensor:
    raise AssertionError(f"unexpected tensor reference {name}")


def _owned(snap: Snapshot, rank: int) -> Any:
    """Fetch a tensor saved by ``rank`` as a tensor of its own (no alias of the read data)."""
    return lambda name: snap.rank_tensor(rank, name).clone()


def _to_devices(saved: Any, now: Any) -> Any:
    """``saved`` with each tensor moved to the device of its counterpart in ``now`` (a tensor
    ``lr`` on the parameters' device stays there), recursively through dicts and tuples."""
    if isinstance(saved, Tensor) and isinstance(now, Tensor):
        return saved.to(now.device)
    if isinstance(saved, dict) and isinstance(now, dict):
        return {k: _to_devices(v, now.get(k)) for k, v in saved.items()}
    if isinstance(saved, tuple | list) and isinstance(now, tuple | list) and len(saved) == len(now):
        return type(saved)(_to_devices(a, b) for a, b in zip(saved, now, strict=True))
    return saved


def _param_state(snap: Snapshot, p: L.ParamLayout) -> dict[str, Any] | None:
    """This rank's state of parameter ``p`` from whichever saved ranks held it."""
    holders = [
        (r, sk["optimizer"]["state"][str(p.index)])
        for r, sk in enumerate(snap.skeletons)
        if str(p.index) in sk["optimizer"]["state"]
    ]
    if not holders:
        return None
    rows = list(p.rows)
    same = [h for h in holders if next(iter(_tensor_refs(h[1])), {"rows": rows})["rows"] == rows]
    r, ref = (same or holders)[0]
    out: dict[str, Any] = {}
    for key, v in ref.items():
        if isinstance(v, dict) and "kind" in v:
            out[key] = _state_tensor(snap, p, key, v, r)
        else:  # non-tensor state; tensors inside it were saved by rank r itself
            out[key] = decode(v, _owned(snap, r))
    return out


def _tensor_refs(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in st.values() if isinstance(v, dict) and "kind" in v]


def _state_tensor(snap: Snapshot, p: L.ParamLayout, key: str, v: dict[str, Any], r: int) -> Tensor:
    t = _state_values(snap, p, key, v, r)
    stride = v.get("stride")
    if stride is None or t.dim() != len(stride):
        return t
    # the saved memory layout (dims ordered by stride), for the same arithmetic after loading
    order = sorted(range(t.dim()), key=lambda d: -stride[d])
    inverse = sorted(range(t.dim()), key=lambda d: order[d])
    return t.permute(order).contiguous().permute(inverse)


def _state_values(snap: Snapshot, p: L.ParamLayout, key: str, v: dict[str, Any], r: int) -> Tensor:
    name, kind = v["__tensor__"], v["kind"]
    if kind == "rows":
        return snap.rows(name, *p.rows)
    if kind == "global":
        return snap.full(name)
    if list(v["rows"]) != list(p.rows):
        raise NotImplementedError(
            f"snapshot {snap.path}: optimizer state {key!r} of parameter {p.name} is "
            f"block-quantized over rows {v['rows']}; this rank holds rows {list(p.rows)}. "
            "Quantized (8/4-bit) state reshards only between layouts that hold the same rows: "
            "load at the saved world size (or, at stages 1/2, train with "
            "layout='whole_tensor', whose whole tensors reshard freely)"
        )
    return snap.rank_tensor(r, name).clone()


def scheduler_state(snap: Snapshot, rank: int) -> Any:
    """This rank's saved scheduler state, decoded (``SnapshotMismatchError`` when the
    snapshot was saved without one)."""
    state = _part(snap, rank, "scheduler")
    r = rank if rank < snap.world else 0
    return decode(state, lambda n: snap.rank_tensor(r, n))


def restore_scheduler(snap: Snapshot, scheduler: Any, rank: int) -> None:
    scheduler.load_state_dict(scheduler_state(snap, rank))


def rng_state(snap: Snapshot, rank: int) -> dict[str, Any] | None:
    """This rank's saved RNG states, read (None: the rank did not exist, or saved none)."""
    if rank >= snap.world:
        log.info("checkpoint: rank %d did not exist at save time; its RNG is not restored", rank)
        return None
    rng = snap.skeletons[rank]["rng"]
    if rng is None:
        return None
    cuda = None
    if torch.cuda.is_available() and rng["cuda_devices"] == torch.cuda.device_count():
        cuda = [snap.rank_tensor(rank, f"rng.cuda.{i}") for i in range(rng["cuda_devices"])]
    kind, pos, has_gauss, gauss = rng["numpy"]
    keys = snap.rank_tensor(rank, "rng.numpy").numpy().astype(np.uint32)
    return {
        "torch": snap.rank_tensor(rank, "rng.torch").clone(),
        "cuda": cuda,
        "numpy": (kind, keys, pos, has_gauss, gauss),
        "python": decode(rng["python"], _no),
    }


def set_rng(state: dict[str, Any] | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def restore_rng(snap: Snapshot, rank: int) -> None:
    set_rng(rng_state(snap, rank))


def restore_extra(snap: Snapshot, rank: int) -> dict[str, Any]:
    r = rank if rank < snap.world else 0
    out: dict[str, Any] = decode(snap.skeletons[r]["extra"], lambda n: snap.rank_tensor(r, n))
    return out
