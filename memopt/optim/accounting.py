"""``state_bytes``: how many bytes of optimizer state each parameter and group holds.

Counts the memory every tensor in ``optimizer.state`` keeps alive (its storage, shared
storages once), split into
*persistent* state (what ``state_dict()`` saves) and *cache* (``cache_*`` entries that
are regenerated from a seed, such as APOLLO's random projection). Formulas per m x n
matrix, d = max(m, n), e = min(m, n), fp32:

- AdamW: 2 m n
- GaLore rank r (one-sided): 2 d r moments + e r basis
- APOLLO rank r: 2 d r moments (+ e r cache, not saved) + 1 limiter scalar
- FRUGAL density rho: 2 d (rho e) moments (+ the basis for svd); block mode: 2 m n for
  the active tensors only
- Natural GaLore: GaLore + s d r history + its s^2 Gram matrix (s = natural_history)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

CACHE_PREFIX = "cache_"


@dataclass(frozen=True)
class StateBytes:
    """Bytes of optimizer state: total, per group and per parameter name."""

    total: int
    cache: int
    per_group: list[int]
    per_param: dict[str, int] = field(repr=False)
    params: int = 0

    @property
    def per_param_element(self) -> float:
        """Persistent state bytes per trainable parameter element."""
        return self.total / max(1, self.params)


def _nbytes(t: Tensor, seen: set[int]) -> int:
    """Bytes of memory ``t`` keeps alive: its whole storage, counted once.

    A state tensor that is a view of a larger buffer keeps all of it alive, so the
    storage size is what counts, not ``numel * element_size``.
    """
    if t.device.type == "meta":
        return 0
    storage = t.untyped_storage()
    key = storage.data_ptr()
    if key in seen:
        return 0
    seen.add(key)
    return int(storage.nbytes())


def state_bytes(optimizer: torch.optim.Optimizer) -> StateBytes:
    """Measure an optimizer's state (any ``torch.optim.Optimizer``, memopt's or not)."""
    seen: set[int] = set()
    total = cache = n_params = 0
    per_group: list[int] = []
    per_param: dict[str, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{gi}.{i}" for i in range(len(group["params"]))]
        g_total = 0
        for name, p in zip(names, group["params"], strict=True):
            n_params += p.numel()
            b = 0
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor):
                    size = _nbytes(v, seen)
                    if str(key).startswith(CACHE_PREFIX):
                        cache += size
                    else:
                        b += size
            per_param[name] = b
            g_total += b
        per_group.append(g_total)
        total += g_total
    return StateBytes(
        total=total, cache=cache, per_group=per_group, per_param=per_param, params=n_params
    )
