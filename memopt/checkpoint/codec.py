"""Nested Python state <-> JSON, with the tensors pulled out by name (no pickle anywhere).

``encode(obj, tensors, prefix)`` returns a JSON-able skeleton in which every tensor is replaced
by ``{"__tensor__": name}`` (the tensor goes into ``tensors[name]``, later a safetensors file);
tuples, dicts with non-string keys and dtypes are tagged so ``decode`` rebuilds the exact
types (an optimizer's ``betas`` stays a tuple, its ``state`` keys stay ints). Floats go through
``json``'s ``repr``, which round-trips every float exactly (NaN and infinities included).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

_SCALARS = (bool, int, float, str, type(None))


def encode(obj: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """A JSON-able copy of ``obj``; tensors go into ``tensors`` under dotted names."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [encode(k, tensors, f"{prefix}.key{i}"), encode(v, tensors, f"{prefix}.{k}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(
        f"checkpoint: {prefix} is a {type(obj).__name__}; snapshots hold tensors, numbers, "
        "strings, lists, tuples and dicts only (no pickle). Convert it, or keep it out of "
        "the state (e.g. in extra= as plain data)"
    )


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
    return {k: decode(v, tensor) for k, v in obj.items()}
