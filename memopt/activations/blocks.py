"""Find a model's repeated blocks: the units the planner decides for.

Default rule: the children of the ``nn.ModuleList`` with the most children (ties: the one
holding more parameters) are the blocks. For a Hugging Face causal LM that is
``model.layers.0 .. model.layers.N-1``; for a plain ``nn.Sequential`` stack or a custom model
with no ``ModuleList``, pass ``blocks=`` explicitly.

``blocks`` may be a regular expression (``re.fullmatch`` against qualified module names, e.g.
``r"model\\.layers\\.\\d+"``) or a sequence of exact names. Names that match no module are an
error, never ignored; a block nested inside another block is an error too (a saved tensor must
belong to exactly one block).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

__all__ = ["BlockSpec", "find_blocks"]

BlockSpec = str | Sequence[str] | None


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _largest_module_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            key = (len(mod), _param_count(mod), name, mod)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList to take blocks from; pass "
            "blocks=<regex or list of module names> (e.g. blocks=r'layers\\.\\d+')"
        )
    prefix = f"{best[2]}." if best[2] else ""
    return [(f"{prefix}{child_name}", child) for child_name, child in best[3].named_children()]


def _check_disjoint(found: list[tuple[str, nn.Module]]) -> None:
    names = [n for n, _ in found]
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(
                    f"block {b!r} lies inside block {a!r}; blocks must not nest "
                    "(pick one level, e.g. only the decoder layers)"
                )


def find_blocks(model: nn.Module, blocks: BlockSpec = None) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` blocks of ``model`` in forward (registration) order."""
    if blocks is None:
        return _largest_module_list(model)
    modules = dict(model.named_modules())
    if isinstance(blocks, str):
        pattern = re.compile(blocks)
        found = [(n, m) for n, m in modules.items() if n and pattern.fullmatch(n)]
        if not found:
            raise ValueError(
                f"blocks={blocks!r} matches no module of {type(model).__name__}; module names "
                f"look like {[n for n in list(modules)[1:6]]}"
            )
    else:
        unknown = [n for n in blocks if n not in modules or not n]
        if unknown:
            raise ValueError(
                f"unknown block names {unknown} in {type(model).__name__}; module names "
                f"look like {[n for n in list(modules)[1:6]]}"
            )
        found = [(n, modules[n]) for n in blocks]
        if len(set(blocks)) != len(found):
            raise ValueError(f"blocks={list(blocks)} names a module twice")
    _check_disjoint(found)
    return found
