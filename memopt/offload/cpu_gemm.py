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
    """Checks, then the native call; a few microseconds of host time on top of the GEMM
    (it runs twice per matrix per optimizer step, so the checks stay arithmetic on values
    already fetched)."""
    if not usable(out, a, b):
        raise ValueError(
            "cpu_gemm: needs AMX-BF16 and 2-D fp32 CPU tensors "
            f"(got {a.dtype}/{a.device}, {b.dtype}/{b.device}, out {out.dtype}/{out.device})"
        )
    m, k = a.shape
    k2, n = b.shape
    om, on = out.shape
    if k2 != k or om != m or on != n:
        shapes = f"{tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}"
        raise ValueError(f"cpu_gemm: shapes {shapes} do not fit")
    cs, ccol = out.stride()
    if n > 1 and ccol != 1 or m > 1 and cs < n:
        raise ValueError(f"cpu_gemm: out needs unit column stride (strides {out.stride()})")
    a_is, a_ks = a.stride()
    b_ks, b_js = b.stride()
    pa, pb, pc = a.data_ptr(), b.data_ptr(), out.data_ptr()
    if not fresh and m and n:
        end_c = pc + 4 * ((m - 1) * cs + n)
        if k and (_overlaps(pc, end_c, pa, m, k, a_is, a_ks)
                  or _overlaps(pc, end_c, pb, k, n, b_ks, b_js)):
            raise ValueError("cpu_gemm: out must not share memory with a or b")
    rc = _library().memopt_bf16_gemm(  # type: ignore[union-attr] # usable() checked
        pa, a_is, a_ks, pb, b_ks, b_js, pc, max(cs, n),
        m, n, k, alpha, beta, int(accumulate), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"cpu_gemm: native bf16 GEMM failed ({_ERRORS.get(rc, rc)})")


def _overlaps(lo: int, hi: int, ptr: int, rows: int, cols: int, rs: int, cs: int) -> bool:
    """Whether [lo, hi) meets the bytes of a rows x cols fp32 matrix at ptr (whole extent:
    conservative; torch strides are never negative)."""
    return ptr < hi and lo < ptr + 4 * ((rows - 1) * rs + (cols - 1) * cs + 1)
