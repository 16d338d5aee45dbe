"""A fused AdamW step on the CPU for fp32 master weights, with low-precision copy-back.

One pass per element reads p, g, m, v and writes p, m, v (28 bytes per fp32 element; the
step is memory-bound), and optionally writes a bf16/fp16 copy of the updated p in the same
pass, the copy a GPU would receive. Gradients may be fp32, bf16 or fp16.

Two implementations, the same arithmetic:

- native: csrc/cpu_adam/cpu_adam.cpp, built at install time and loaded with ctypes (the
  GIL is released during the call). OpenMP over fixed-size chunks; an AVX-512, AVX2 or
  scalar body chosen at run time from cpuid (``available_isas()``), or forced with
  ``MEMOPT_CPU_ADAM_ISA=scalar|avx2|avx512``; ``MEMOPT_CPU_ADAM_ISA=torch`` forces the
  fallback.
- fallback: ``torch._fused_adamw_`` on CPU (plus a conversion of low-precision gradients
  and a ``copy_`` for the low-precision copy), used when the library is absent.

Both eps placements of ``memopt.optim._functional``:
``"torch"`` (torch.optim.AdamW): p <- p (1 - lr wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps);
``"galore"``: p <- (p - lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps)) (1 - lr wd).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from memopt._utils.native import load_library, mark_written

EpsMode = Literal["torch", "galore"]
ISAS = ("scalar", "avx2", "avx512")
ENV_ISA = "MEMOPT_CPU_ADAM_ISA"
CHUNK = 1 << 16  # elements per OpenMP work item: 256 KiB per fp32 stream, L2-sized
_ABI = 7  # 2: memopt_lowrank_adam; 3: memopt_adamw_q8
# 4: memopt_q8_quantize / memopt_q8_dequantize; 5: memopt_channel_sumsq; 6: memopt_bf16_gemm
# 7: memopt_projected_adam
_DTYPE_CODE = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_LOWP = (torch.bfloat16, torch.float16)
_UNSET = object()
_lib: object = _UNSET

TensorOrList = Tensor | Sequence[Tensor]


def _library() -> ctypes.CDLL | None:
    """The loaded native library (loaded once), or None."""
    global _lib
    if _lib is _UNSET:
        lib = load_library(Path(__file__).parent, "_cpu_adam_lib", "memopt_cpu_adam", _ABI)
        if lib is not None:
            p = ctypes.c_void_p
            lib.memopt_cpu_adam_step.restype = ctypes.c_int
            lib.memopt_cpu_adam_step.argtypes = [
                ctypes.c_int64, p, p, p, p, p, p,
                ctypes.c_int, ctypes.c_int, p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
            ]  # fmt: skip
            f = ctypes.c_float
            lib.memopt_lowrank_adam.restype = ctypes.c_int
            lib.memopt_lowrank_adam.argtypes = [
                p, p, p, p, ctypes.c_int64, ctypes.c_int64, f, f, f, f, f, f, ctypes.c_int, p, p,
            ]  # fmt: skip
            i = ctypes.c_int
            lib.memopt_adamw_q8.restype = ctypes.c_int
            lib.memopt_adamw_q8.argtypes = [
                p, i, p, i, p, p, p, p, p, p, p, p, p, p, i, i, ctypes.c_int64,
                f, f, f, f, f, f, f, f, i, i, i, i,
            ]  # fmt: skip
            lib.memopt_q8_quantize.restype = ctypes.c_int
            lib.memopt_q8_quantize.argtypes = [p, ctypes.c_int64, p, p, i, p, p, i, i]
            lib.memopt_q8_dequantize.restype = ctypes.c_int
            lib.memopt_q8_dequantize.argtypes = [p, p, ctypes.c_int64, p, i, p, i, i]
            i64 = ctypes.c_int64
            lib.memopt_channel_sumsq.restype = ctypes.c_int
            lib.memopt_channel_sumsq.argtypes = [p, i64, i64, i64, i, p]
            lib.memopt_bf16_gemm_available.restype = ctypes.c_int
            lib.memopt_bf16_gemm.restype = ctypes.c_int
            lib.memopt_bf16_gemm.argtypes = [
                p, i64, i64, p, i64, i64, p, i64, i64, i64, i64, f, f, i, i,
            ]  # fmt: skip
            lib.memopt_projected_adam.restype = ctypes.c_int
            lib.memopt_projected_adam.argtypes = [
                p, i64, i64, p, i64, i64, p, i64, p, p, i64, i64, i64, i, f, f, f, f, f, f, f, f, i,
            ]  # fmt: skip
        _lib = lib
    return _lib  # type: ignore[return-value]


def native_available() -> bool:
    """Whether the native kernel was built and loaded (else the torch fallback runs)."""
    return _library() is not None


def has_openmp() -> bool:
    """Whether the native kernel was built with OpenMP (False also when it is absent)."""
    lib = _library()
    return bool(lib is not None and lib.memopt_cpu_adam_has_openmp())


def available_isas() -> tuple[str, ...]:
    """The native bodies this CPU can run, slowest first; empty without the library."""
    lib = _library()
    if lib is None:
        return ()
    mask = int(lib.memopt_cpu_adam_isa_mask())
    return tuple(name for i, name in enumerate(ISAS) if mask & (1 << i))


def selected_isa() -> str:
    """The path the next step takes: "scalar", "avx2", "avx512" or "torch" (fallback).

    ``MEMOPT_CPU_ADAM_ISA`` (read at every call) forces one; unset or "auto" picks the
    widest the CPU supports. Asking for a body the CPU lacks is a ValueError.
    """
    want = os.environ.get(ENV_ISA, "auto").strip().lower() or "auto"
    if want not in (*ISAS, "auto", "torch"):
        raise ValueError(f"{ENV_ISA}={want!r}; choose one of: auto, torch, {', '.join(ISAS)}")
    have = available_isas()
    if want == "torch" or not have:
        return "torch"
    if want == "auto":
        return have[-1]
    if want not in have:
        raise ValueError(
            f"{ENV_ISA}={want!r}, but this CPU (or build) supports only: {', '.join(have)}"
        )
    return want


def adamw_constants(
    *, step: int, lr: float, beta1: float, beta2: float, weight_decay: float, eps_mode: EpsMode
) -> tuple[float, float, float, float]:
    """(c2, step_size, pre, post) of p <- (p pre - step_size m / (sqrt(v) c2 + eps)) post."""
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    if eps_mode == "torch":
        return 1.0 / math.sqrt(bc2), lr / bc1, 1.0 - lr * weight_decay, 1.0
    return 1.0, lr * math.sqrt(bc2) / bc1, 1.0, 1.0 - lr * weight_decay


def cpu_adamw_step_(
    params: TensorOrList,
    grads: TensorOrList,
    exp_avgs: TensorOrList,
    exp_avg_sqs: TensorOrList,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    eps_mode: EpsMode = "torch",
    out_lowp: TensorOrList | None = None,
    num_threads: int | None = None,
) -> str:
    """One AdamW step, in place, over fp32 CPU tensors; returns the path taken.

    ``step`` is the 1-based step count of the bias corrections. ``grads`` are fp32, bf16 or
    fp16 (one dtype for the call). ``out_lowp``, if given, receives the updated parameters
    in bf16 or fp16 (round to nearest even). Every tensor is contiguous, on the CPU, and
    the same size as its parameter. ``num_threads`` defaults to ``torch.get_num_threads()``.
    """
    p, g, m, v = (_as_list(x) for x in (params, grads, exp_avgs, exp_avg_sqs))
    out = None if out_lowp is None else _as_list(out_lowp)
    _validate(p, g, m, v, out, step, eps_mode)
    isa = selected_isa()
    if isa == "torch":
        _torch_step(p, g, m, v, out, step, lr, beta1, beta2, eps, weight_decay, eps_mode)
    else:
        c2, step_size, pre, post = adamw_constants(
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps_mode=eps_mode,
        )
        consts = (beta1, beta2, eps, c2, step_size, pre, post)
        _native_step(p, g, m, v, out, consts, ISAS.index(isa), num_threads)
    return isa


def _as_list(x: TensorOrList) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _validate(
    p: list[Tensor],
    g: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    out: list[Tensor] | None,
    step: int,
    eps_mode: str,
) -> None:
    if eps_mode not in ("torch", "galore"):
        raise ValueError(f"eps_mode={eps_mode!r}; choose 'torch' or 'galore'")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step={step!r}: the 1-based step count (an int >= 1)")
    lists = {"grads": g, "exp_avgs": m, "exp_avg_sqs": v, **({"out_lowp": out} if out else {})}
    for name, xs in lists.items():
        if len(xs) != len(p):
            raise ValueError(f"{len(p)} params but {len(xs)} {name}")
    allowed = {
        "params": (p, (torch.float32,)),
        "grads": (g, tuple(_DTYPE_CODE)),
        "exp_avgs": (m, (torch.float32,)),
        "exp_avg_sqs": (v, (torch.float32,)),
        "out_lowp": (out or [], _LOWP),
    }
    for name, (xs, dtypes) in allowed.items():
        for i, (x, ref) in enumerate(zip(xs, p, strict=False)):
            if x.device.type != "cpu" or not x.is_contiguous():
                raise ValueError(f"{name}[{i}] must be a contiguous CPU tensor (got {x.device})")
            if x.dtype not in dtypes or x.numel() != ref.numel():
                raise ValueError(
                    f"{name}[{i}] is {x.dtype} with {x.numel()} elements; expected one of "
                    f"{dtypes} with {ref.numel()} (the size of params[{i}])"
                )
    for name, xs in (("grads", g), ("out_lowp", out or [])):
        if len({x.dtype for x in xs}) > 1:
            raise ValueError(f"{name} mix dtypes {sorted({str(x.dtype) for x in xs})}; use one")


def _native_step(
    p: list[Tensor],
    g: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    out: list[Tensor] | None,
    consts: tuple[float, ...],
    isa: int,
    num_threads: int | None,
) -> None:
    lib = _library()
    assert lib is not None
    n = len(p)
    if n == 0:
        return

    def ptrs(xs: list[Tensor]) -> ctypes.Array[ctypes.c_void_p]:
        return (ctypes.c_void_p * n)(*[x.data_ptr() for x in xs])

    numels = (ctypes.c_int64 * n)(*[x.numel() for x in p])
    hyper = (ctypes.c_double * 7)(*consts)
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    rc = lib.memopt_cpu_adam_step(
        n, ptrs(p), ptrs(g), ptrs(m), ptrs(v), None if out is None else ptrs(out),
        numels, _DTYPE_CODE[g[0].dtype], 0 if out is None else _DTYPE_CODE[out[0].dtype],
        hyper, isa, max(1, threads), CHUNK,
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"memopt_cpu_adam_step failed with code {rc} (isa {ISAS[isa]})")
    mark_written(*p, *m, *v, *(out or []))


def _torch_step(
    p: list[Tensor],
    g: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    out: list[Tensor] | None,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    eps_mode: str,
) -> None:
    """The fallback: torch's fused CPU AdamW (the galore form through its eps rescaling)."""
    if not p:
        return
    grads = [x if x.dtype == torch.float32 else x.float() for x in g]
    kernel_eps, kernel_wd = eps, weight_decay
    if eps_mode == "galore":
        # m/(sqrt(v)+eps) * lr sqrt(bc2)/bc1 == m/(sqrt(v)/sqrt(bc2) + eps/sqrt(bc2)) * lr/bc1
        kernel_eps, kernel_wd = eps / math.sqrt(1.0 - beta2**step), 0.0
    steps = [torch.full((), float(step))] * len(p)
    torch._fused_adamw_(
        p, grads, m, v, [], steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=kernel_wd, eps=kernel_eps,
        amsgrad=False, maximize=False,
    )  # fmt: skip
    if eps_mode == "galore" and weight_decay:
        torch._foreach_mul_(p, 1.0 - lr * weight_decay)
    if out:
        torch._foreach_copy_(out, p)
