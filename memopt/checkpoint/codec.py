"""Nested Python state <-> JSON, with the tensors pulled out by name (no pickle anywhere).

``encode(obj, tensors, prefix)`` returns a JSON-able skeleton in which every tensor is replaced
by ``{"__tensor__": name}`` (the tensor goes into ``tensors[name]``, later a safetensors file);
tuples, dicts with non-string keys and dtypes are tagged so ``decode`` rebuilds the exact
types (an optimizer's ``betas`` stays a tuple, its ``state`` keys stay ints), and so are
``collections.Counter`` and ``OrderedDict`` (a ``MultiStepLR``'s milestones stay a Counter);
other ``Mapping`` types (``defaultdict``: its factory is code) come back as plain dicts.
Floats go through ``json``'s ``repr``, which round-trips every float exactly (NaN and
infinities included).

Tensor names are the dotted key path (``extra.ema.layer.weight``). Two paths can spell the
same name (``{"a.b": t1, "a": {"b": t2}}``, ``{0: t1, "0": t2}``): ``encode`` refuses that
with a ``ValueError`` naming both keys, since one tensor would silently replace the other.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

_SCALARS = (bool, int, float, str, type(None))
# Mapping types rebuilt by name on decode (exact types only: a subclass is a plain dict)
_MAPPINGS: dict[str, type] = {"Counter": Counter, "OrderedDict": OrderedDict}


def encode(
    obj: Any, tensors: dict[str, Tensor], prefix: str, paths: dict[str, str] | None = None
) -> Any:
    """A JSON-able copy of ``obj``; tensors go into ``tensors`` under dotted names.

    ``paths`` (name -> the key path that produced it) is filled for the error message when
    two key paths give one name; pass the same dict to calls that share ``tensors``."""
    return _encode(obj, tensors, prefix, prefix, {} if paths is None else paths)


def _encode(
    obj: Any, tensors: dict[str, Tensor], prefix: str, path: str, paths: dict[str, str]
) -> Any:
    if isinstance(obj, Tensor):
        if prefix in tensors:
            first = paths.get(prefix, "an earlier entry")
            raise ValueError(
                f"checkpoint: {first} and {path} are two tensors with the same name {prefix!r} "
                "in the snapshot (dotted key paths, keys compared as strings); one would "
                "replace the other. Rename one of the keys"
            )
        tensors[prefix] = obj
        paths[prefix] = path
        return {"__tensor__": prefix}
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple | list):
        out = [
            _encode(v, tensors, f"{prefix}.{i}", f"{path}[{i}]", paths) for i, v in enumerate(obj)
        ]
        return {"__tuple__": out} if isinstance(obj, tuple) else out
    if isinstance(obj, Mapping):
        inner = _encode_mapping(obj, tensors, prefix, path, paths)
        kind = type(obj).__name__
        if _MAPPINGS.get(kind) is type(obj):
            return {"__mapping__": kind, "__value__": inner}
        return inner
    raise TypeError(
        f"checkpoint: {prefix} is a {type(obj).__name__}; snapshots hold tensors, numbers, "
        "strings, lists, tuples and dicts only (no pickle). Convert it, or keep it out of "
        "the state (e.g. in extra= as plain data)"
    )


def _encode_mapping(
    obj: Mapping[Any, Any],
    tensors: dict[str, Tensor],
    prefix: str,
    path: str,
    paths: dict[str, str],
) -> Any:
    if all(isinstance(k, str) and not k.startswith("__") for k in obj):
        return {
            k: _encode(v, tensors, f"{prefix}.{k}", f"{path}[{k!r}]", paths) for k, v in obj.items()
        }
    return {
        "__items__": [
            [
                _encode(k, tensors, f"{prefix}.key{i}", f"key #{i} of {path}", paths),
                _encode(v, tensors, f"{prefix}.{k}", f"{path}[{k!r}]", paths),
            ]
            for i, (k, v) in enumerate(obj.items())
        ]
    }


def decode(obj: Any, tensor: Callable[[str], Tensor]) -> Any:
    """Inverse of ``encode``; ``tensor(name)`` fetches a stored tensor."""
    if isinstance(obj, list):
        return [decode(v, tensor) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensor(obj["__tensor__"])
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensor) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensor): decode(v, tensor) for k, v in obj["__items__"]}
    if "__mapping__" in obj:
        cls = _MAPPINGS.get(obj["__mapping__"])
        if cls is None:
            raise ValueError(
                f"checkpoint: unknown mapping type {obj['__mapping__']!r} in a snapshot"
            )
        return cls(decode(obj["__value__"], tensor))
    return {k: decode(v, tensor) for k, v in obj.items()}
