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

from memopt._utils.native import mark_written
from memopt.offload.cpu_adam import _library

__all__ = ["addmm_", "available", "mm", "projected_adam_", "usable"]

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
    cs, pc, end_c = _output(out, "cpu_gemm: out")
    a_is, a_ks = a.stride()
    b_ks, b_js = b.stride()
    pa, pb = a.data_ptr(), b.data_ptr()
    if not fresh and m and n:
        if k and (
            _overlaps(pc, end_c, pa, m, k, a_is, a_ks) or _overlaps(pc, end_c, pb, k, n, b_ks, b_js)
        ):
            raise ValueError("cpu_gemm: out must not share memory with a or b")
    rc = _library().memopt_bf16_gemm(  # type: ignore[union-attr] # usable() checked
        pa, a_is, a_ks, pb, b_ks, b_js, pc, cs,
        m, n, k, alpha, beta, int(accumulate), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"cpu_gemm: native bf16 GEMM failed ({_ERRORS.get(rc, rc)})")
    if not fresh:
        mark_written(out)


def projected_adam_(
    g: Tensor,
    basis: Tensor,
    w: Tensor,
    m: Tensor,
    v: Tensor,
    *,
    right: bool,
    beta1: float,
    beta2: float,
    eps: float,
    c2: float,
    alpha: float,
    beta: float,
) -> None:
    """One matrix's GaLore step in one native call (``csrc/cpu_adam/projected_adam.cpp``).

    ``R = g @ basis.T`` (``right``; ``basis`` r x n) or ``basis.T @ g`` (left; m x r), Adam's
    moments ``m``, ``v`` (R's shape) advanced in place with direction ``D = m / (sqrt(v) c2 +
    eps)``, then ``w = beta * w + alpha * (D @ basis)`` (right) or ``(basis @ D)`` (left).
    Both products in bf16 arithmetic, exactly as ``mm`` / ``addmm_`` and
    ``cpu_lowrank.lowrank_adam`` called one after the other (bitwise the same results).
    ``g`` and ``basis`` may have any strides; ``m`` and ``v`` are contiguous; ``w`` has unit
    column stride and shares no memory with the others.
    """
    if not usable(g, basis, w, m, v):
        raise ValueError("projected_adam_: needs AMX-BF16 and 2-D fp32 CPU tensors")
    rows, cols = g.shape
    r = basis.shape[0] if right else basis.shape[1]
    low_shape = (rows, r) if right else (r, cols)
    need_basis = (r, cols) if right else (rows, r)
    if tuple(w.shape) != (rows, cols) or tuple(basis.shape) != need_basis or r == 0:
        raise ValueError(
            f"projected_adam_: grad {tuple(g.shape)}, basis {tuple(basis.shape)} and weight "
            f"{tuple(w.shape)} do not fit a {'right' if right else 'left'} projection"
        )
    if tuple(m.shape) != low_shape or tuple(v.shape) != low_shape:
        raise ValueError(
            f"projected_adam_: moments {tuple(m.shape)} / {tuple(v.shape)}, expected {low_shape}"
        )
    if not (m.is_contiguous() and v.is_contiguous()):
        raise ValueError("projected_adam_: the moments must be contiguous")
    ws, pw, end_w = _output(w, "projected_adam_: the weight")
    gs, gcol = g.stride()
    bs, bcol = basis.stride()
    n_low = low_shape[0] * low_shape[1]
    if (
        _overlaps(pw, end_w, g.data_ptr(), rows, cols, gs, gcol)
        or _overlaps(pw, end_w, basis.data_ptr(), basis.shape[0], basis.shape[1], bs, bcol)
        or _overlaps(pw, end_w, m.data_ptr(), 1, n_low, 1, 1)
        or _overlaps(pw, end_w, v.data_ptr(), 1, n_low, 1, 1)
    ):
        raise ValueError("projected_adam_: the weight must not share memory with the others")
    rc = _library().memopt_projected_adam(  # type: ignore[union-attr] # usable() checked
        g.data_ptr(), gs, gcol, basis.data_ptr(), bs, bcol, pw, ws, m.data_ptr(),
        v.data_ptr(), rows, cols, r, int(right), beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        eps, c2, alpha, beta, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"projected_adam_: native step failed ({_ERRORS.get(rc, rc)})")
    mark_written(w, m, v)


def _output(out: Tensor, what: str) -> tuple[int, int, int]:
    """(row stride for the kernel, first byte, end byte) of a 2-D fp32 output, which needs
    unit column stride."""
    rows, cols = out.shape
    rs, cs = out.stride()
    if cols > 1 and cs != 1 or rows > 1 and rs < cols:
        raise ValueError(f"{what} needs unit column stride (strides {out.stride()})")
    ptr = out.data_ptr()
    return max(rs, cols), ptr, ptr + 4 * ((rows - 1) * rs + cols)


def _overlaps(lo: int, hi: int, ptr: int, rows: int, cols: int, rs: int, cs: int) -> bool:
    """Whether [lo, hi) meets the bytes of a rows x cols fp32 matrix at ptr (whole extent:
    conservative; torch strides are never negative)."""
    return ptr < hi and lo < ptr + 4 * ((rows - 1) * rs + (cols - 1) * cs + 1)
