"""bf16 GEMMs on Intel AMX tiles for fp32 CPU tensors (``csrc/cpu_adam/bf16_gemm.cpp``).

``addmm_(out, a, b, alpha=, beta=)`` computes ``out = beta * out + alpha * a @ b`` and
``mm(a, b)`` returns ``a @ b``, with ``a`` and ``b`` rounded to bf16 (nearest even) and the
products summed in fp32: the arithmetic of oneDNN's bf16 math mode for fp32 matmuls, which
is what ``matmul_dtype="bfloat16"`` asks of the projection GEMMs. The operands may have any
strides (a transposed view costs nothing extra); ``out`` needs unit column stride.

It lives beside the native Adam passes because the build and loader are this package's;
``memopt.optim.projection.lowp`` routes the projection GEMMs here on CPUs that have AMX
(``usable``), and to oneDNN elsewhere.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from memopt.offload.cpu_adam import _library

__all__ = ["addmm_", "available", "mm", "usable"]

_ERRORS = {
    -1: "this CPU has no AMX-BF16 (or the kernel refused the tile state)",
    -2: "bad sizes",
    -3: "the packing buffer could not be allocated",
}


@functools.cache
def available() -> bool:
    """Whether the library is loaded, the CPU has AMX-BF16 and Linux granted the tiles."""
    lib = _library()
    return lib is not None and bool(lib.memopt_bf16_gemm_available())


def usable(*ts: Tensor) -> bool:
    """True when the kernel can take these tensors (available, CPU, fp32, 2-D)."""
    if not available():
        return False
    for t in ts:  # a loop, not all(<genexpr>): called per parameter per step
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2:
            return False
    return True


def addmm_(out: Tensor, a: Tensor, b: Tensor, *, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """``out = beta * out + alpha * (a @ b)`` in bf16 arithmetic; ``beta=0`` ignores ``out``."""
    _run(out, a, b, alpha, beta, accumulate=True, fresh=False)
    return out


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` in bf16 arithmetic, into ``out`` (a new tensor by default)."""
    fresh = out is None
    if out is None:
        out = torch.empty(a.shape[0], b.shape[-1], dtype=torch.float32)
    _run(out, a, b, 1.0, 0.0, accumulate=False, fresh=fresh)
    return out


def _run(
    out: Tensor, a: Tensor, b: Tensor, alpha: float, beta: float, accumulate: bool, fresh: bool
) -> None:
    """Checks, then the native call; about 6 us of host time on top of the GEMM."""
    if not usable(out, a, b):
        raise ValueError(
            "cpu_gemm: needs AMX-BF16 and 2-D fp32 CPU tensors "
            f"(got {a.dtype}/{a.device}, {b.dtype}/{b.device}, out {out.dtype}/{out.device})"
        )
    m, k = a.shape
    k2, n = b.shape
    if k2 != k or out.shape[0] != m or out.shape[1] != n:
        shapes = f"{tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}"
        raise ValueError(f"cpu_gemm: shapes {shapes} do not fit")
    cs, ccol = out.stride()
    if n > 1 and ccol != 1 or m > 1 and cs < n:
        raise ValueError(f"cpu_gemm: out needs unit column stride (strides {out.stride()})")
    if not fresh and out.numel() and (_shares_memory(out, a) or _shares_memory(out, b)):
        raise ValueError("cpu_gemm: out must not share memory with a or b")
    a_is, a_ks = a.stride()
    b_ks, b_js = b.stride()
    rc = _library().memopt_bf16_gemm(  # type: ignore[union-attr] # usable() checked
        a.data_ptr(), a_is, a_ks, b.data_ptr(), b_ks, b_js, out.data_ptr(), max(cs, n),
        m, n, k, alpha, beta, int(accumulate), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"cpu_gemm: native bf16 GEMM failed ({_ERRORS.get(rc, rc)})")


def _shares_memory(x: Tensor, y: Tensor) -> bool:
    """Whether the byte ranges of x and y overlap (a conservative test: whole extents)."""
    if y.numel() == 0:
        return False
    lo_x, hi_x = _extent(x)
    lo_y, hi_y = _extent(y)
    return lo_x < hi_y and lo_y < hi_x


def _extent(t: Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of a tensor (torch strides are never negative)."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (span + 1) * t.element_size()
