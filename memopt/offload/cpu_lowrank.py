"""The native one-pass Adam on a projected gradient (``csrc/cpu_adam/lowrank_adam.cpp``).

``lowrank_adam(low, m, v, ...)`` advances Adam's moments of ``low`` (an fp32 ``r x n``
projected gradient) in place and returns the direction ``m / (sqrt(v) c2 + eps)``, with,
for APOLLO, the squared norms of the direction and of ``low`` per row (``norms_dim=1``) or per
column (``norms_dim=0``): what ``memopt.optim.kernels.adam_update`` computes in about eight
torch passes, in one. It lives here, beside the AdamW step in the same library, because the
native build and its loader are this package's; ``memopt.optim.kernels`` dispatches to it for
contiguous fp32 CPU tensors when the library is present (``usable``).

``channel_sumsq(g, dim)`` (``csrc/cpu_adam/channel_sumsq.cpp``) is APOLLO's other read of a
full-size tensor: the sums of squares of G per row (``dim=1``) or per column (``dim=0``),
for the norm-growth limiter, at memory speed in both directions (torch's column norms of a
row-major matrix run several times slower than its row norms).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from memopt._utils.native import mark_written
from memopt.offload.cpu_adam import _library

__all__ = ["channel_sumsq", "lowrank_adam", "usable"]


def usable(*ts: Tensor) -> bool:
    """True when the native kernel can take these tensors (loaded, CPU, fp32, contiguous)."""
    if _library() is None:
        return False
    for t in ts:  # a loop, not all(<genexpr>): called per parameter per step
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    return True


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
    mark_written(m, v)
    return out, num, den


def channel_sumsq(g: Tensor, dim: int) -> Tensor:
    """Sums of squares of a 2-D fp32 CPU matrix over ``dim``, returned in fp32.

    Column sums accumulate in double; row sums in 32 float lanes joined in double.
    ``dim=1`` gives one sum per row, ``dim=0`` one per column. Rows may be strided (any
    ``g.stride(0) >= g.shape[1]``); elements within a row must be contiguous.
    """
    lib = _library()
    if lib is None or g.dim() != 2 or g.device.type != "cpu" or g.dtype != torch.float32:
        raise ValueError("channel_sumsq: needs the native library and a 2-D fp32 CPU matrix")
    if dim not in (0, 1):
        raise ValueError(f"channel_sumsq: dim must be 0 or 1, got {dim}")
    rows, cols = g.shape
    if cols > 1 and g.stride(1) != 1 or rows > 1 and g.stride(0) < cols:
        raise ValueError(f"channel_sumsq: rows must be contiguous, got strides {g.stride()}")
    out = torch.empty(rows if dim == 1 else cols, dtype=torch.float32)
    ld = max(int(g.stride(0)), cols)
    rc = lib.memopt_channel_sumsq(g.data_ptr(), rows, cols, ld, dim, out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"memopt_channel_sumsq failed (code {rc}) on {rows}x{cols}, dim {dim}")
    return out
