"""The native one-pass Adam on a projected gradient (``csrc/cpu_adam/lowrank_adam.cpp``).

``lowrank_adam(low, m, v, ...)`` advances Adam's moments of ``low`` (an fp32 ``r x n``
projected gradient) in place and returns the direction ``m / (sqrt(v) c2 + eps)``, with,
for APOLLO, the squared norms of the direction and of ``low`` per row (``norms_dim=1``) or per
column (``norms_dim=0``): what ``memopt.optim.kernels.adam_update`` computes in about eight
torch passes, in one. It lives here, beside the AdamW step in the same library, because the
native build and its loader are this package's; ``memopt.optim.kernels`` dispatches to it for
contiguous fp32 CPU tensors when the library is present (``usable``).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from memopt.offload.cpu_adam import _library

__all__ = ["lowrank_adam", "usable"]


def usable(*ts: Tensor) -> bool:
    """True when the native kernel can take these tensors (loaded, CPU, fp32, contiguous)."""
    return _library() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in ts
    )


def lowrank_adam(
    low: Tensor,
    m: Tensor,
    v: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    c2: float,
    norms_dim: int | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(direction, num, den); ``m`` and ``v`` updated in place. 2-D fp32 contiguous CPU only."""
    lib = _library()
    if lib is None or low.dim() != 2 or not usable(low, m, v):
        raise ValueError(
            "lowrank_adam: needs the native library and 2-D fp32 contiguous CPU tensors"
        )
    if m.shape != low.shape or v.shape != low.shape:
        raise ValueError(f"lowrank_adam: shapes {low.shape}, {m.shape}, {v.shape} differ")
    rows, cols = low.shape
    out = torch.empty_like(low)
    num = den = None
    if norms_dim is not None:
        n = rows if norms_dim == 1 else cols
        num = torch.empty(n, dtype=torch.float32)
        den = torch.empty(n, dtype=torch.float32)
    rc = lib.memopt_lowrank_adam(
        low.data_ptr(), m.data_ptr(), v.data_ptr(), out.data_ptr(), rows, cols,
        ctypes.c_float(beta1), ctypes.c_float(1.0 - beta1), ctypes.c_float(beta2),
        ctypes.c_float(1.0 - beta2), ctypes.c_float(eps), ctypes.c_float(c2),
        -1 if norms_dim is None else int(norms_dim),
        None if num is None else num.data_ptr(), None if den is None else den.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"memopt_lowrank_adam failed (code {rc}) on {rows}x{cols}")
    return out, num, den
