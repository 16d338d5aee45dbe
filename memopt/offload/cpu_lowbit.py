"""The native AdamW step on 8-bit block-quantized moments (``csrc/cpu_adam/lowbit_adam.cpp``).

``adamw_q8(p, g, m_q, m_absmax, v_q, v_absmax, ...)`` advances one parameter and its int8
moments (uint8 codes, fp32 absmax per 256-element block) in place, in one pass per block:
what the eager path does by dequantizing to fp32 tensors, calling ``torch._fused_adamw_``
and quantizing back. The arithmetic and the quantization are those of the Triton kernel
(``memopt.optim.kernels.triton_lowbit``), so the result equals the torch path's bit for bit.
``memopt.optim.kernels.lowbit_adam`` builds the arguments (codes, search tables, fp32
scalars) and dispatches here for CPU tensors when the library is loaded (``usable``).

``q8_quantize`` / ``q8_dequantize`` are the kernel's block quantization on its own (the
same routines): ``memopt.optim.lowbit.quant.quantize_blockwise`` / ``dequantize_blockwise``
call them for 8-bit, 256-element-block state on the CPU, with the same results bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memopt._utils.native import mark_written
from memopt.offload.cpu_adam import _DTYPE_CODE, _library
from memopt.offload.cpu_adam import native_available as available

__all__ = ["adamw_q8", "available", "q8_dequantize", "q8_quantize", "usable"]

QBLOCK = 256  # elements per absmax block, fixed in the kernel
KEY_SHIFT = 19  # search cells: y's float32 pattern >> 19, fixed in the kernel
_SCALARS = ("keep_pre", "keep_post", "lerp_w", "c2", "b2", "step_size", "bc2_sqrt", "eps")


def usable(p: Tensor, g: Tensor) -> bool:
    """True when the native kernel can take this parameter and gradient."""
    return (
        available()
        and p.device.type == "cpu"
        and g.device.type == "cpu"
        and p.dtype in _DTYPE_CODE
        and g.dtype in _DTYPE_CODE
        and p.is_contiguous()
        and g.is_contiguous()
        and g.numel() == p.numel()
    )


def _loaded(fn: str) -> Any:
    lib = _library()
    if lib is None:
        raise ValueError(f"{fn}: the native library is not loaded")
    return lib


def _threads(num_threads: int | None) -> int:
    return max(1, num_threads if num_threads is not None else torch.get_num_threads())


def _check(name: str, t: Tensor, dtype: torch.dtype, numel: int, fn: str = "adamw_q8") -> None:
    if t.device.type != "cpu" or t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
        raise ValueError(
            f"{fn}: {name} must be a contiguous CPU {dtype} tensor of {numel} elements, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def adamw_q8(
    p: Tensor,
    g: Tensor,
    m_q: Tensor,
    m_absmax: Tensor,
    v_q: Tensor,
    v_absmax: Tensor,
    *,
    codes: tuple[Tensor, Tensor],
    tables: tuple[tuple[Tensor, Tensor, int], tuple[Tensor, Tensor, int]],
    scalars: dict[str, Any],
    first: bool,
    num_threads: int | None = None,
    vector_search: bool = True,
) -> None:
    """One AdamW step of ``p`` (fp32/bf16/fp16) on int8 moments, all in place.

    ``codes``: the signed and unsigned 256-entry fp32 codes; ``tables``: their
    ``(padded midpoints, cell counts, steps)`` from ``lowbit_adam.search_tables``, with the
    cell counts as int32 (so the kernel's lookups vectorize as gathers);
    ``scalars``: ``lowbit_adam._scalars`` (fp32-rounded floats and ``LERP_FROM_G``);
    ``first``: the moments start at zero (the code arrays are only written);
    ``vector_search=False`` keeps the code search on the lookup tables even where the
    AVX-512 register search would run (both give the same codes; for tests).
    """
    lib = _library()
    if lib is None or not usable(p, g):
        raise ValueError("adamw_q8: needs the native library and contiguous CPU tensors")
    n = p.numel()
    n_blocks = -(-n // QBLOCK)
    _check("m_q", m_q, torch.uint8, n)
    _check("v_q", v_q, torch.uint8, n)
    _check("m_absmax", m_absmax, torch.float32, n_blocks)
    _check("v_absmax", v_absmax, torch.float32, n_blocks)
    for code in codes:
        _check("code", code, torch.float32, 256)
    for mids, base, steps in tables:
        _check("midpoints", mids, torch.float32, 255 + 2**steps)
        _check("cell table", base, torch.int32, 2 ** (32 - KEY_SHIFT))
    (m_mids, m_base, m_steps), (v_mids, v_base, v_steps) = tables
    rc = lib.memopt_adamw_q8(
        p.data_ptr(), _DTYPE_CODE[p.dtype], g.data_ptr(), _DTYPE_CODE[g.dtype],
        m_q.data_ptr(), m_absmax.data_ptr(), v_q.data_ptr(), v_absmax.data_ptr(),
        codes[0].data_ptr(), codes[1].data_ptr(), m_mids.data_ptr(), v_mids.data_ptr(),
        m_base.data_ptr(), v_base.data_ptr(), m_steps, v_steps, n,
        *(float(scalars[k]) for k in _SCALARS), int(first), int(bool(scalars["LERP_FROM_G"])),
        _threads(num_threads), int(vector_search),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"memopt_adamw_q8 failed (code {rc}) on {n} elements")
    mark_written(p, m_q, m_absmax, v_q, v_absmax)


def q8_quantize(
    x: Tensor,
    q: Tensor,
    absmax: Tensor,
    *,
    table: tuple[Tensor, Tensor, int],
    num_threads: int | None = None,
    vector_search: bool = True,
) -> None:
    """Block-quantize fp32 ``x`` into ``q`` (uint8, ``x.numel()``) and ``absmax`` (fp32, one
    per 256 elements), as ``quantize_blockwise(x, code, 256, bits=8)`` does.

    ``table``: the code's ``(padded midpoints, int32 cell counts, steps)`` as ``adamw_q8``
    takes them. ``vector_search=False`` keeps the table search on AVX-512 CPUs (for tests).
    """
    fn = "q8_quantize"
    lib = _loaded(fn)
    n = x.numel()
    _check("x", x, torch.float32, n, fn)
    _check("q", q, torch.uint8, n, fn)
    _check("absmax", absmax, torch.float32, -(-n // QBLOCK), fn)
    mids, base, steps = table
    _check("midpoints", mids, torch.float32, 255 + 2**steps, fn)
    _check("cell table", base, torch.int32, 2 ** (32 - KEY_SHIFT), fn)
    rc = lib.memopt_q8_quantize(
        x.data_ptr(), n, mids.data_ptr(), base.data_ptr(), steps, q.data_ptr(),
        absmax.data_ptr(), _threads(num_threads), int(vector_search),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"memopt_q8_quantize failed (code {rc}) on {n} elements")


def q8_dequantize(
    q: Tensor,
    absmax: Tensor,
    code: Tensor,
    out: Tensor,
    *,
    num_threads: int | None = None,
    vector_lookup: bool = True,
) -> None:
    """``out = code[q] * absmax[block]`` (fp32 product, rounded to ``out``'s dtype: fp32,
    bf16 or fp16), as ``dequantize_blockwise(q, absmax, code, 256, ..., bits=8)`` does.

    ``code``: 256 fp32 values. ``vector_lookup=False`` keeps the plain indexed loads on
    AVX-512 CPUs (for tests).
    """
    fn = "q8_dequantize"
    lib = _loaded(fn)
    n = q.numel()
    _check("q", q, torch.uint8, n, fn)
    _check("absmax", absmax, torch.float32, -(-n // QBLOCK), fn)
    _check("code", code, torch.float32, 256, fn)
    if out.dtype not in _DTYPE_CODE:
        raise ValueError(f"q8_dequantize: out must be fp32, bf16 or fp16, got {out.dtype}")
    _check("out", out, out.dtype, n, fn)
    rc = lib.memopt_q8_dequantize(
        q.data_ptr(), absmax.data_ptr(), n, code.data_ptr(), _DTYPE_CODE[out.dtype],
        out.data_ptr(), _threads(num_threads), int(vector_lookup),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"memopt_q8_dequantize failed (code {rc}) on {n} elements")
