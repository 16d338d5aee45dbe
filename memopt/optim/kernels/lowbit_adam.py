"""AdamW on 8-bit block-quantized moments in one fused kernel: Triton (``triton_lowbit``)
on GPUs, native C++ (``memopt.offload.cpu_lowbit``) on the CPU.

``adamw_lowbit_step_`` steps one parameter whose moments are stored as int8 codes
(``_moments``: ``exp_avg_q`` / ``exp_avg_absmax`` with the signed dynamic code,
``exp_avg_sq_q`` / ``exp_avg_sq_absmax`` with the unsigned one, 256-element blocks), and
rewrites the codes and absmax in place. Which kernel: Triton where ``kernels.backend``
says so (CUDA tensors under ``MEMOPT_KERNELS=auto``, any tensor under ``triton``); the
native one for CPU tensors under ``auto`` when the native library is loaded
(``MEMOPT_KERNELS=torch`` forces the eager path everywhere). It returns False, doing
nothing, whenever the eager torch path must run instead: no kernel applies, int4 state,
``correct_bias=False`` (the reference arithmetic), a tensor lr, non-contiguous tensors or
dtypes other than fp32/bf16/fp16. The first step (no codes yet) runs here too: the
moments start at zero, as ``_moments.load`` gives them.

Parity with the torch path (``moments.load`` -> ``torch._fused_adamw_`` on fp32 working
copies -> ``moments.store``). Quantization is exact: the same fp32 products dequantize, the
same absmax, a correctly rounded ``m / absmax``, and the index ``count(midpoints < y)``
against the same fp32 midpoints, which is what ``nearest_index`` returns, ties to the lower
code included. The Adam arithmetic is written in the form torch's CPU fused AdamW
computes (scalars rounded to fp32, one rounding per operation):

    p = p * (1 - lr wd)                         (torch form; the galore form multiplies after)
    m = fma(1 - b1, g - m, m)                   (m.lerp_(g, 1 - b1); from g when 1 - b1 >= 0.5)
    v = fma(g * (1 - b2), g, v * b2)
    p = p - (lr / bc1 * m) / (sqrt(v) / sqrt(bc2) + eps')

with ``eps' = eps / sqrt(bc2)`` and the decay after the update for the galore form, as
``_full_adam._fused`` maps it. On CPU (TRITON_INTERPRET=1) the kernel then matches the
torch path bit for bit (parameters, codes, absmax). torch's CUDA fused kernel rounds its
own way, so on a GPU parameters and moments agree to float rounding (an ulp), and a code
can differ by one only where a moment lies within that rounding of a midpoint (none did in
``tests/optim/triton_checks.py`` on an H100).

CPU (``csrc/cpu_adam/lowbit_adam.cpp``): the same arithmetic and quantization in C++,
one quantization block at a time in L1 (OpenMP over groups of blocks), compiled without
fp contraction, ``std::fma`` where the form above has fma, IEEE division and square root.
It equals the torch path bit for bit (parameters, codes, absmax; ``tests/optim/
test_native_lowbit.py``). On AVX-512 CPUs the code lookups run in registers (permutes
instead of gathers: the 256-entry code for dequantization, the midpoints level by level for
the search), elsewhere through the ``search_tables`` tables (cell counts as int32).

Speed on CPU (``benchmarks/int8_adam_cpu.py``, one LLaMA-350M block, 12.6M fp32 parameters, an
AVX-512 Xeon VM, 2 threads): ``AdamW.step()`` with ``state_dtype="int8"`` 20 ms against
122 ms on the eager path and 7.7 ms for torch's fused fp32 AdamW (1 thread: 38, 153 and
13 ms). The kernel is bound by its vector instructions, not memory (16 bytes per element at
about 10 GB/s): in one-thread timings of variants, about half is the re-quantization (the
two divisions by absmax and the searches), a fifth the Adam step's divisions and root.

Speed (H100, one LLaMA-1B block, 51M fp32 parameters): the kernel takes 0.42 ms (16 bytes
per element: about 2 TB/s), 0.35 ms with bf16 parameters (10 bytes); ``AdamW.step()``
with ``state_dtype="int8"`` 0.49 ms against 5.1 ms on the eager path and 0.56 ms for
torch's fused fp32 AdamW. ``BLOCKS`` / ``NUM_WARPS`` were chosen there.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch
from torch import Tensor

from memopt._utils.native import mark_written
from memopt.offload import cpu_lowbit
from memopt.optim import _functional as F
from memopt.optim import _moments as moments
from memopt.optim.kernels import backend, native_cpu_on
from memopt.optim.lowbit import DEFAULT_BLOCK_SIZE, state_code

QBLOCK = DEFAULT_BLOCK_SIZE[8]  # elements per absmax block (the int8 state's)
BLOCKS = 1  # quantization blocks per program (best on an H100)
CPU_BLOCKS = 16  # under TRITON_INTERPRET=1 the cost is per program: fewer, larger ones
NUM_WARPS = 1
KEY_SHIFT = 19  # search cells: the top 13 bits of y's float32 pattern (4 mantissa bits)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TABLES: dict[tuple[bool, torch.device], tuple[Tensor, Tensor, int]] = {}
_NATIVE_TABLES: dict[bool, tuple[Tensor, Tensor, int]] = {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (what a kernel's fp32 scalar argument holds)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def midpoints(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The int8 state code's 255 fp32 midpoints, formed as ``nearest_index`` forms them."""
    code = state_code("int8", signed, torch.device(device))
    return (code[:-1] + code[1:]) / 2


def search_tables(signed: bool, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(midpoints padded with +inf, uint8 count of midpoints below each cell, search steps).

    Cell k holds the floats whose bit pattern shifted right by ``KEY_SHIFT`` is k: a
    contiguous range of values. A y in it has ``base[k] + count(mids[base[k]:] < y)``
    midpoints below it, and at most the cell's own midpoints lie in [cell_min, y), so a
    binary search of ``steps`` over the next ``2**steps - 1`` midpoints finishes the count.
    """
    key = (signed, device)
    if key not in _TABLES:
        mids = midpoints(signed)  # on CPU: the same fp32 sums as on any device
        cells = torch.arange(2 ** (32 - KEY_SHIFT), dtype=torch.int64)
        ends = [(cells << KEY_SHIFT) + off for off in (0, 2**KEY_SHIFT - 1)]
        lo, hi = (
            torch.where(e >= 2**31, e - 2**32, e).to(torch.int32).view(torch.float32) for e in ends
        )
        first, last = torch.minimum(lo, hi), torch.maximum(lo, hi)
        base = torch.bucketize(first, mids)  # midpoints strictly below the cell
        finite = first.isfinite() & last.isfinite()
        span = int((torch.bucketize(last, mids) - base)[finite].max())
        steps = max(1, span.bit_length())  # 2**steps - 1 >= span
        base = torch.where(finite, base, 0).to(torch.uint8)
        padded = torch.cat([mids, mids.new_full((2**steps,), math.inf)])
        _TABLES[key] = (padded.to(device), base.to(device), steps)
    return _TABLES[key]


def native_search_tables(signed: bool) -> tuple[Tensor, Tensor, int]:
    """``search_tables`` on the CPU with the cell counts widened to int32 (the native
    routines' layout: 32 KiB, and their lookups become vector gathers); shared by the AdamW
    kernel and ``lowbit.native``'s quantization."""
    if signed not in _NATIVE_TABLES:
        mids, base, steps = search_tables(signed, torch.device("cpu"))
        _NATIVE_TABLES[signed] = (mids, base.to(torch.int32), steps)
    return _NATIVE_TABLES[signed]


def _quant_ok(state: dict[str, Any], p: Tensor) -> bool:
    """Whether stored codes (if any) are contiguous, on p's device and sized for p."""
    if "exp_avg_q" not in state:
        return "exp_avg" not in state
    n, n_blocks = p.numel(), _cdiv(p.numel(), QBLOCK)
    want = (
        ("exp_avg_q", torch.uint8, n),
        ("exp_avg_sq_q", torch.uint8, n),
        ("exp_avg_absmax", torch.float32, n_blocks),
        ("exp_avg_sq_absmax", torch.float32, n_blocks),
    )
    for key, dtype, numel in want:
        t = state.get(key)
        if not isinstance(t, Tensor) or t.dtype != dtype or t.numel() != numel:
            return False
        if t.device != p.device or not t.is_contiguous():
            return False
    return math.prod(state.get("moment_shape", ())) == n


def _route(p: Tensor) -> str | None:
    """Which kernel may take ``p``: "triton" (``kernels.backend``), "native" (CPU tensors
    under ``MEMOPT_KERNELS=auto`` with the native library loaded) or None (torch path)."""
    if backend(p) == "triton":
        return "triton"
    if p.device.type == "cpu" and native_cpu_on():
        return "native"
    return None


def _eligible(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> str | None:
    """The kernel that takes this step ("triton" or "native"), or None for the torch path."""
    g = p.grad
    if g is None or moments.lowbit_kind(group, p.numel()) != "int8":
        return None
    route = _route(p)
    if route is None:
        return None
    if not group.get("correct_bias", True) or isinstance(group["lr"], Tensor):
        return None
    if p.dtype not in _DTYPES or g.dtype not in _DTYPES or g.layout != torch.strided:
        return None
    if g.shape != p.shape or g.device != p.device:
        return None
    ok = p.is_contiguous() and g.is_contiguous() and _quant_ok(state, p)
    return route if ok else None


def _allocate(state: dict[str, Any], p: Tensor) -> None:
    n, n_blocks = p.numel(), _cdiv(p.numel(), QBLOCK)
    for name in ("exp_avg", "exp_avg_sq"):
        state[f"{name}_q"] = torch.empty(n, dtype=torch.uint8, device=p.device)
        state[f"{name}_absmax"] = torch.empty(n_blocks, dtype=torch.float32, device=p.device)
    state["moment_shape"] = list(p.shape)


def _scalars(group: dict[str, Any], eps_mode: F.EpsMode, t: int) -> dict[str, Any]:
    """The kernel's scalar arguments, rounded to fp32 the way torch's fused kernel does."""
    b1, b2 = group["betas"]
    lr, wd, eps = group["lr"], group.get("weight_decay", 0.0), group["eps"]
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    keep = 1.0 - lr * wd if wd else 1.0
    if eps_mode == "galore":
        eps, keep_pre, keep_post = eps / math.sqrt(bc2), 1.0, keep
    else:
        keep_pre, keep_post = keep, 1.0
    w = _f32(1.0 - b1)
    from_g = not abs(w) < 0.5  # torch's lerp: weight - 1 from the end point g
    return {
        "keep_pre": _f32(keep_pre),
        "keep_post": _f32(keep_post),
        "lerp_w": _f32(w - 1.0) if from_g else w,
        "c2": _f32(1.0 - b2),
        "b2": _f32(b2),
        "step_size": _f32(lr / bc1),
        "bc2_sqrt": _f32(math.sqrt(bc2)),
        "eps": _f32(eps),
        "LERP_FROM_G": from_g,
    }


def adamw_lowbit_step_(
    p: Tensor, state: dict[str, Any], group: dict[str, Any], eps_mode: F.EpsMode, t: int
) -> bool:
    """One fused AdamW step for ``p`` on its int8 moments; False (untouched) if ineligible.

    ``t`` is the bias-correction step (``_full_adam`` counts it), ``eps_mode`` the eps
    placement. Parameter, codes and absmax are updated in place.
    """
    route = _eligible(p, state, group)
    if route is None:
        return False
    first = "exp_avg_q" not in state
    if first:
        _allocate(state, p)
    if route == "native":
        assert p.grad is not None
        cpu_lowbit.adamw_q8(
            p, p.grad, state["exp_avg_q"], state["exp_avg_absmax"],
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"],
            codes=(state_code("int8", True, p.device), state_code("int8", False, p.device)),
            tables=(native_search_tables(True), native_search_tables(False)),
            scalars=_scalars(group, eps_mode, t), first=first,
        )  # fmt: skip
        return True
    from memopt.optim.kernels import triton_lowbit

    n = p.numel()
    m_mids, m_base, m_steps = search_tables(True, p.device)
    v_mids, v_base, v_steps = search_tables(False, p.device)
    blocks = CPU_BLOCKS if p.device.type == "cpu" else BLOCKS
    grid = (_cdiv(_cdiv(n, QBLOCK), blocks),)
    triton_lowbit.adamw_q8[grid](
        p, p.grad, state["exp_avg_q"], state["exp_avg_absmax"],
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"],
        state_code("int8", True, p.device), state_code("int8", False, p.device),
        m_mids, v_mids, m_base, v_base, n,
        **_scalars(group, eps_mode, t), FIRST=first, KEY_SHIFT=KEY_SHIFT, STEPS_M=m_steps,
        STEPS_V=v_steps, BLOCKS=blocks, QBLOCK=QBLOCK,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    mark_written(
        p, state["exp_avg_q"], state["exp_avg_absmax"], state["exp_avg_sq_q"],
        state["exp_avg_sq_absmax"],
    )  # fmt: skip
    return True
