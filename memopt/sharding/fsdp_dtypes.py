"""Stage 3's dtypes, unit by unit: which parameters become the fp32 masters, which FSDP2
``MixedPrecisionPolicy`` each ``fully_shard`` call gets, and the dtype mixes FSDP2 cannot run.

FSDP2 takes one policy per unit (one ``param_dtype``: every floating parameter of the unit is
gathered and computed in it) and needs the unit's trainable parameters to share one dtype
(else an ``AssertionError`` at the first forward). A unit's *own* parameters are those
``fully_shard`` gives it: units are sharded bottom-up, each takes its parameters that no unit
sharded before it took, and the root takes the rest (``unit_params``).

With ``master_dtype`` M and no ``FSDPOptions.mp_policy`` (``plan_dtypes``):

- a floating parameter narrower than M that is trainable, or that the optimizer holds (it
  may be unfrozen later and then needs a master), is cast to M just before its unit is
  sharded: its shards *are* the masters. A frozen parameter the optimizer does not hold keeps
  its dtype, as at stages 1/2. One the optimizer holds that is wider than M, or as wide in
  another format (fp16 with M = bf16), is refused, as at stages 1/2 (``masters``: a master
  must be wider than its parameter; before, an fp16 model with M = bf16 trained without
  masters here and with bf16 masters at stages 1/2);
- a model whose floating parameters all share one dtype d narrower than M gets one policy,
  ``MixedPrecisionPolicy(param_dtype=d, reduce_dtype=M)``, on every unit and the root (FSDP2
  also casts each unit's floating inputs to d): the behaviour before per-unit policies;
- a model that mixes dtypes gets a policy per unit: a unit with masters gets
  ``param_dtype`` = its parameters' own dtype with ``cast_forward_inputs=False`` (the model
  moves activations between dtypes itself, as on one process), a unit without none (its fp32
  layers compute in fp32). A unit that would hold masters *and* parameters of another dtype
  is refused: its one ``param_dtype`` would run the others in the wrong dtype.

With an explicit ``mp_policy`` it is used for every unit, and the narrower parameters above are
cast to M. In every case a unit whose trainable parameters (after that cast) have several
dtypes is refused up front, naming the unit, the parameters, their dtypes and the ways out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memopt.sharding.masters import check_master_dtypes

Named = list[tuple[str, nn.Parameter]]


@dataclass
class UnitDtypes:
    """One ``fully_shard`` call: ``module`` (the model itself for the root), the parameters
    to cast to the master dtype just before it, and its policy (None: FSDP2's default)."""

    name: str
    module: nn.Module
    cast: list[nn.Parameter]
    policy: Any


def shard_order(model: nn.Module, units: Sequence[nn.Module]) -> list[nn.Module]:
    """``units`` deepest first (FSDP2 needs a nested unit sharded before its parent)."""
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
    return sorted(units, key=lambda m: -depth[id(m)])


def unit_params(model: nn.Module, units: Sequence[nn.Module]) -> list[tuple[str, nn.Module, Named]]:
    """``(name, module, own parameters)`` per ``fully_shard`` call, in call order (the root
    last, ``name`` "")."""
    names = {id(m): n for n, m in model.named_modules()}  # each module once, first name
    pnames = {id(p): n for n, p in model.named_parameters()}
    taken: set[int] = set()
    out = []
    for module in [*shard_order(model, units), model]:
        own = [(pnames[id(p)], p) for p in module.parameters() if id(p) not in taken]
        taken.update(id(p) for _, p in own)
        out.append((names.get(id(module), ""), module, own))
    return out


def plan_dtypes(
    model: nn.Module,
    units: Sequence[nn.Module],
    master: torch.dtype | None,
    user_policy: Any,
    held: set[int],
) -> list[UnitDtypes]:
    """The casts and policies of every ``fully_shard`` call (see the module docstring);
    raises a ValueError (the same on every rank) for a mix FSDP2 cannot run."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    every = [p for p in model.parameters() if p.is_floating_point()]
    kinds = {p.dtype for p in every}
    uniform = None
    if master is not None and user_policy is None and len(kinds) == 1:
        (dtype,) = kinds
        if _narrower(dtype, master):
            uniform = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=master)
    plans = []
    for name, module, own in unit_params(model, units):
        floats = [(n, p) for n, p in own if p.is_floating_point()]
        cast: Named = []
        if master is not None:
            check_master_dtypes(((n, p) for n, p in floats if id(p) in held), master)
            wants = [p.requires_grad or id(p) in held for _, p in floats]  # may need a master
            cast = [(n, p) for (n, p), w in zip(floats, wants, strict=True)
                    if w and _narrower(p.dtype, master)]  # fmt: skip
        policy = user_policy if user_policy is not None else uniform
        if policy is None and cast:
            mixed = _by_dtype(floats)
            if len(mixed) > 1:
                raise ValueError(_mixed_master_message(name, module, mixed, cast, held, master))
            policy = MixedPrecisionPolicy(
                param_dtype=cast[0][1].dtype, reduce_dtype=master, cast_forward_inputs=False
            )
        recast = {id(p) for _, p in cast}
        after = _by_dtype([(n, p) for n, p in floats if p.requires_grad], master, recast)
        if len(after) > 1:
            raise ValueError(_mixed_trainable_message(name, module, after, master))
        plans.append(UnitDtypes(name, module, [p for _, p in cast], policy))
    return plans


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    return torch.finfo(dtype).bits < torch.finfo(than).bits


def _by_dtype(
    named: Named, master: torch.dtype | None = None, recast: set[int] | None = None
) -> dict[torch.dtype, list[str]]:
    """Parameter names per dtype (a parameter in ``recast`` counted as ``master``)."""
    out: dict[torch.dtype, list[str]] = {}
    for n, p in named:
        dtype = master if recast and id(p) in recast and master is not None else p.dtype
        out.setdefault(dtype, []).append(n)
    return out


def _describe(name: str, module: nn.Module, mixed: dict[torch.dtype, list[str]]) -> str:
    unit = (
        f"unit {name!r} ({type(module).__name__})"
        if name
        else (f"root unit ({type(module).__name__}: the parameters no other unit took)")
    )
    parts = [f"{d}: {ns[:4]}{' ...' if len(ns) > 4 else ''}" for d, ns in mixed.items()]
    return f"the FSDP2 {unit} holds {'; '.join(parts)}"


def _separate(name: str, mixed: dict[torch.dtype, list[str]]) -> str:
    """A hint naming the submodules that would make the minority dtype units of their own."""
    largest = max(mixed.values(), key=len)
    owners = sorted({n.rpartition(".")[0] for ns in mixed.values() if ns is not largest
                     for n in ns} - {name})  # fmt: skip
    modules = f" such as {owners[:4]} (model.get_submodule(name))" if owners else ""
    return (
        f"give the modules of one dtype units of their own{modules} in FSDPOptions(modules="
        "[...]) (nested units are fine; with the default policy list its units too: "
        "memopt.sharding.fsdp.default_units(model))"
    )


def _mixed_trainable_message(
    name: str, module: nn.Module, mixed: dict[torch.dtype, list[str]], master: torch.dtype | None
) -> str:
    cast = f" (after the cast to master_dtype={master})" if master is not None else ""
    return (
        f"memopt.shard(stage=3): {_describe(name, module, mixed)}: trainable parameters of "
        f"several dtypes{cast}, but FSDP2 needs one original dtype per unit (it fails at the "
        f"first forward otherwise). Ways out: {_separate(name, mixed)}; cast the unit to one "
        "dtype; or, where every dtype is at most float32, master_dtype=torch.float32 with an "
        "explicit FSDPOptions(mp_policy=MixedPrecisionPolicy(param_dtype=...)) (every unit "
        "then computes in that one dtype). Stages 1/2 train mixed dtypes as they are"
    )


def _mixed_master_message(
    name: str,
    module: nn.Module,
    mixed: dict[torch.dtype, list[str]],
    cast: Named,
    held: set[int],
    master: torch.dtype | None,
) -> str:
    low = cast[0][1].dtype
    frozen = [n for n, p in cast if not p.requires_grad and id(p) in held]
    note = (
        f" ({frozen[:4]} are frozen but held by the optimizer, so they get masters in case "
        "they are unfrozen; build the optimizer without them to keep them as they are)"
        if frozen else ""
    )  # fmt: skip
    return (
        f"memopt.shard(stage=3, master_dtype={master}): {_describe(name, module, mixed)}. "
        f"The {low} ones{note} would become {master} masters that FSDP2 gathers and computes "
        f"in {low} (MixedPrecisionPolicy.param_dtype, one per unit), so the others would "
        f"compute in {low} too, unlike stages 1/2. Ways out: {_separate(name, mixed)}; cast "
        "the unit to one dtype; or pass FSDPOptions(mp_policy=...) to choose one compute "
        "dtype for every unit"
    )
