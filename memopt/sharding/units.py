"""Stage 3's FSDP2 units: which modules are sharded as one all-gather group, checked before
``fully_shard`` touches the model.

FSDP2 manages each parameter in exactly one unit (the innermost ``fully_shard`` module whose
subtree holds it; the root takes the rest). A parameter reachable from two units (a head tied
to the embedding, a weight shared by two blocks, a sub-layer reused inside two blocks) fails
deep inside FSDP2 at the first forward, and a module given to ``fully_shard`` twice (a block
repeated in a ``ModuleList``, ``[block] * n``) fails with a bare ``AssertionError`` after the
earlier units were already converted. So, before any change to the model:

- ``owners`` maps every parameter to the units that would hold it, walking the module tree
  by path (a module reached along two paths is seen twice, as ``fully_shard`` would);
- the default policy (``default_units``: the children holding parameters of the outermost
  ``ModuleList``\\ s) drops repeated modules and then, until nothing changes, every unit
  that shares a parameter with another unit or with the root: their parameters join the
  root with the other users (as a tied embedding and head already do), with a warning
  naming them;
- a list the user gave (``FSDPOptions.modules``) is not changed: a module listed twice or a
  parameter in two units is a ``ValueError`` naming the parameter, its other names, the
  units, and what to list instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

__all__ = ["check_units", "default_units", "owners", "resolve_units", "unit_names"]

ROOT = -1  # the owner index of parameters no unit holds


def default_units(model: nn.Module) -> list[nn.Module]:
    """Children holding parameters of the outermost ``ModuleList``\\ s (not the root), each
    module once."""
    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                units.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                visit(child)

    visit(model)
    return _unique(units)


def _unique(units: Sequence[nn.Module]) -> list[nn.Module]:
    seen: set[int] = set()
    out = []
    for u in units:
        if id(u) not in seen:
            seen.add(id(u))
            out.append(u)
    return out


def unit_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> its first dotted path in model`` (the root: ``"the root"``)."""
    names = {id(m): n for n, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    names[id(model)] = "the root"
    return names


def owners(model: nn.Module, units: Sequence[nn.Module]) -> dict[int, tuple[list[str], set[int]]]:
    """``id(parameter) -> (its names, the indexes in units of the units holding it)``;
    ``ROOT`` for the root. A parameter belongs to the innermost unit on each path to it."""
    index = {id(u): i for i, u in enumerate(units)}
    out: dict[int, tuple[list[str], set[int]]] = {}

    def visit(m: nn.Module, prefix: str, owner: int) -> None:
        owner = index.get(id(m), owner)
        for name, p in m._parameters.items():
            if p is not None:
                names, held = out.setdefault(id(p), ([], set()))
                names.append(prefix + name)
                held.add(owner)
        for name, child in m._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.", owner)

    visit(model, "", ROOT)
    return out


def _shared(model: nn.Module, units: Sequence[nn.Module]) -> list[tuple[list[str], set[int]]]:
    return [(names, held) for names, held in owners(model, units).values() if len(held) > 1]


def resolve_units(
    model: nn.Module, modules: Sequence[nn.Module] | None, warn: bool = True
) -> list[nn.Module]:
    """The units ``fully_shard`` gets (before the root): ``modules`` checked, or the default
    policy with shared parameters moved to the root (see the module docstring; ``warn``:
    say which units were dropped)."""
    if modules is not None:
        check_units(model, modules)
        return list(modules)
    units = default_units(model)
    dropped: list[str] = []
    names = unit_names(model)
    while True:
        bad = {i for _, held in _shared(model, units) for i in held if i != ROOT}
        if not bad:
            break
        dropped += [names[id(units[i])] for i in sorted(bad)]
        units = [u for i, u in enumerate(units) if i not in bad]
    if dropped and warn:
        warnings.warn(
            f"memopt.shard(stage=3): the default units {dropped[:6]} share parameters with "
            "another unit or the root (tied or reused weights), which FSDP2 cannot split "
            "across units; their parameters are sharded with the root instead (gathered "
            "whole for each forward). Choose the units with FSDPOptions(modules=...) to "
            "group them otherwise",
            stacklevel=3,
        )
    return units


def check_units(model: nn.Module, units: Sequence[nn.Module]) -> None:
    """The user's ``FSDPOptions.modules``: each a proper submodule of ``model``, listed once,
    and no parameter in two units (counting the root); raise a ValueError naming it."""
    inside = {id(m) for m in model.modules()}
    names = unit_names(model)
    seen: set[int] = set()
    for u in units:
        if u is model:
            raise ValueError(
                "memopt.shard: FSDPOptions.modules must not contain the model itself "
                "(the root is always sharded last)"
            )
        if id(u) not in inside:
            raise ValueError(
                f"memopt.shard: FSDPOptions.modules holds a {type(u).__name__} that is not a "
                "submodule of the model"
            )
        if id(u) in seen:
            raise ValueError(
                f"memopt.shard(stage=3): FSDPOptions.modules lists the module {names[id(u)]!r} "
                "more than once (the same object, e.g. a block repeated in a ModuleList); "
                "FSDP2 shards a module once: list each module object once"
            )
        seen.add(id(u))
    shared = _shared(model, units)
    if shared:
        pnames, held = shared[0]
        where = sorted("the root" if i == ROOT else repr(names[id(units[i])]) for i in held)
        also = f" (also named {pnames[1:4]})" if len(pnames) > 1 else ""
        raise ValueError(
            f"memopt.shard(stage=3): parameter {pnames[0]!r}{also} would be held by the FSDP2 "
            f"units {', '.join(where)}; FSDP2 shards each parameter in one unit only (it "
            "fails at the first forward otherwise). Leave out of FSDPOptions.modules the "
            "modules that share it (their parameters then join the root with the other "
            "users, e.g. a head tied to the embedding), or list one module that contains "
            f"every user. ({len(shared)} shared parameter(s) in all)"
        )
