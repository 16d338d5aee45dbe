"""Stage 3 from a model built on the meta device: no rank ever holds the whole model.

A user builds the model under ``torch.device("meta")`` (shapes only, no storage) and the
optimizer over those parameters, then calls ``memopt.shard(model, opt, stage=3)``. After
``fully_shard`` has replaced every parameter by a (still meta) ``DTensor`` row shard,
``materialize`` allocates each rank's local shards on the target device (``to_empty``; tied
parameters and buffers are tied again after it) and initializes the model **one module at a
time**, children before their parent (Hugging Face's ``initialize_weights`` order): the
module's own parameters are swapped for full-size temporary tensors, ``init_fn(module)`` fills
them (default: the module's ``reset_parameters()``), and each rank copies its rows (FSDP2's
``Shard(0)`` split: rank r holds rows ``[r c, min((r+1) c, rows))``, ``c = ceil(rows / W)``)
into its shard; the temporaries are dropped.

An initializer may also write tensors of a module's descendants (GPT-2 scales its residual
projections ``c_proj`` from ``GPT2Attention`` / ``GPT2MLP``). Which ones is found first by a
dry run of ``init_fn`` on each module that has descendants, over meta stand-ins of every
tensor below it (their version counters say what was written; the RNG state is restored).
A descendant's temporary written by an ancestor is kept from its own module's turn until the
ancestor's, then copied in again. Peak host/device memory is the local shards plus the
largest single module's full parameters (plus those kept temporaries), never the whole model
unless an initializer writes every tensor below the root.

Every rank runs the same initializer on the same full tensors, so with the same seed on all
ranks the shards are consistent, and the values equal an eager single-process build whenever
the model's constructor initializes modules in that order (true of plain ``nn.Linear``
stacks). A Hugging Face model needs ``init_fn=hf_model._init_weights``: its weights are then a
draw from the same initializer, not the eager build's exact values (that constructor first
consumes the RNG in each ``nn.Linear``'s own reset). Buffers are allocated by ``to_empty`` and
filled by the same ``init_fn`` calls (they are not sharded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from memopt.sharding.plan import chunk_rows

InitFn = Callable[[nn.Module], None]


def is_meta(model: nn.Module) -> bool:
    """True when any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def check_meta(model: nn.Module, init_fn: InitFn | None) -> None:
    """A meta model must be all-meta, and every module holding tensors needs an initializer."""
    real = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if not t.is_meta]
    if real:
        raise ValueError(
            f"memopt.shard: the model is partly on the meta device ({real[:3]} are not); build "
            "all of it under torch.device('meta') or none of it (accelerate's "
            "init_empty_weights() keeps buffers real by default: use "
            "init_empty_weights(include_buffers=True))"
        )
    if init_fn is not None:
        return
    lacking = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if _holds_tensors(m) and not callable(getattr(m, "reset_parameters", None))
    ]
    if lacking:
        raise ValueError(
            f"memopt.shard: the model is on the meta device and modules {lacking[:4]} have no "
            "reset_parameters() to initialize them; pass FSDPOptions(init_fn=...) (for a Hugging "
            "Face model: init_fn=model._init_weights)"
        )


def _holds_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(
        True for _ in m.buffers(recurse=False)
    )


def _reset(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


Slot = tuple[nn.Module, str, str]  # (module, "_parameters" | "_buffers", name)


def _slots(module: nn.Module, recurse: bool) -> list[tuple[Slot, Tensor]]:
    """Every registered parameter and buffer slot of ``module`` (and below, if ``recurse``)."""
    out = []
    for m in module.modules() if recurse else (module,):
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is not None:
                    out.append(((m, kind, name), t))
    return out


def _put(slot: Slot, t: Tensor) -> None:
    module, kind, name = slot
    getattr(module, kind)[name] = t


def _shared(model: nn.Module) -> list[list[Slot]]:
    """The slots of each tensor registered in more than one place (tied weights)."""
    by_id: dict[int, list[Slot]] = {}
    for slot, t in _slots(model, True):
        by_id.setdefault(id(t), []).append(slot)
    return [slots for slots in by_id.values() if len(slots) > 1]


def _retie(groups: list[list[Slot]]) -> None:
    """Tie again what ``to_empty`` untied (on plain tensors it makes one new tensor per slot)."""
    for slots in groups:
        module, kind, name = slots[0]
        first = getattr(module, kind)[name]
        for slot in slots[1:]:
            _put(slot, first)


def _post_order(model: nn.Module) -> list[nn.Module]:
    """Every module once, children before their parent (``PreTrainedModel.initialize_weights``
    order: depth first over ``children()``)."""
    seen: set[int] = set()
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        seen.add(id(m))
        for child in m.children():
            if id(child) not in seen:
                visit(child)
        out.append(m)

    visit(model)
    return out


def _stand_in(t: Tensor, device: torch.device | str) -> Tensor:
    new = torch.empty(t.shape, dtype=t.dtype, device=device)
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def _writes_below(module: nn.Module, name: str, init: InitFn, device: torch.device) -> set[int]:
    """The ids of the tensors below ``module`` (not its own) that ``init(module)`` writes: a
    dry run over meta stand-ins of every tensor of the subtree, RNG state restored."""
    slots = _slots(module, True)
    own = {id(t) for slot, t in slots if slot[0] is module}
    if all(slot[0] is module for slot, _ in slots):
        return set()
    stand: dict[int, Tensor] = {}
    for slot, t in slots:
        stand.setdefault(id(t), _stand_in(t, "meta"))
        _put(slot, stand[id(t)])
    before = {k: v._version for k, v in stand.items()}
    devices = [device] if device.type != "cpu" else []
    try:
        with torch.random.fork_rng(devices, device_type=device.type), torch.no_grad():
            init(module)
    except Exception as e:
        raise RuntimeError(
            f"memopt.shard: init_fn({name or type(module).__name__}) failed on meta-device "
            "stand-ins, which memopt passes to an initializer of a module with submodules "
            f"first to find which of their tensors it writes ({type(e).__name__}: {e}); make "
            "init_fn work on meta tensors there, or leave that module alone"
        ) from e
    finally:
        for slot, t in slots:
            _put(slot, t)
    return {k for k, v in stand.items() if v._version != before[k] and k not in own}


def _copy_in(p: Tensor, value: Tensor, rank: int, world: int) -> None:
    """Copy this rank's rows of the full ``value`` into ``p`` (a DTensor shard, or plain)."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        rows = p.shape[0] if p.dim() else 0
        start, end = chunk_rows(rows, -(-rows // world), rank)
        p.to_local().copy_(value[start:end] if p.dim() else value)
    else:
        p.copy_(value)


def materialize(
    model: nn.Module, device: torch.device, rank: int, world: int, init_fn: InitFn | None
) -> None:
    """Allocate ``model``'s (DTensor) shards on ``device`` and initialize them module by
    module, children first (see the module docstring)."""
    init = init_fn or _reset
    ties = _shared(model)
    model.to_empty(device=device)
    _retie(ties)
    order = _post_order(model)
    names = {id(m): n for n, m in model.named_modules()}
    below = {
        id(m): _writes_below(m, names.get(id(m), ""), init, device)
        for m in order
        if init_fn is not None or callable(getattr(m, "reset_parameters", None))
    }
    last: dict[int, int] = {}  # tensor id -> the last module (order index) that writes it
    for i, m in enumerate(order):
        for k in below.get(id(m), ()):
            last[k] = i
    kept: dict[int, Tensor] = {}  # full temporaries an ancestor still writes
    for i, module in enumerate(order):
        _init_one(module, i, init, below.get(id(module), set()), kept, last, rank, world, device)


def _init_one(
    module: nn.Module, i: int, init: InitFn, below: set[int], kept: dict[int, Tensor],
    last: dict[int, int], rank: int, world: int, device: torch.device,
) -> None:  # fmt: skip
    """``init(module)`` over full temporaries of its own parameters and of the parameters
    below it that it writes (``below``); then copy this rank's rows into the shards."""
    if not _holds_tensors(module) and not below:
        return
    slots = _slots(module, bool(below))
    own = {id(t) for slot, t in slots if slot[0] is module and slot[1] == "_parameters"}
    real: dict[int, Tensor] = {}
    full: dict[int, Tensor] = {}
    for slot, t in slots:
        k = id(t)
        if slot[1] != "_parameters" or (k not in own and k not in below):
            continue  # buffers are full already: written in place
        if k not in full:
            real[k] = t
            held = kept.pop(k, None)
            full[k] = _stand_in(t, device) if held is None else held
        _put(slot, full[k])
    try:
        with torch.no_grad():
            init(module)
    finally:
        for slot, t in slots:
            _put(slot, t)
    with torch.no_grad():
        for k, p in real.items():
            _copy_in(p, full[k], rank, world)
            if last.get(k, -1) > i:
                kept[k] = full[k]


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The optimizer's parameters by model name, per group (to find them again once
    ``fully_shard`` or ``to_empty`` has replaced the parameter objects)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def rebind(model: nn.Module, optimizer: torch.optim.Optimizer, order: list[list[str]]) -> None:
    """Point the optimizer's groups at the model's current parameter objects, by name."""
    new = dict(model.named_parameters())
    for group, names in zip(optimizer.param_groups, order, strict=True):
        group["params"] = [new[n] for n in names]
