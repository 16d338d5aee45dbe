"""Reduced-precision projection GEMMs: the ``matmul_dtype="bfloat16"`` option.

Three routes, picked per operand (``route``):

- ``"native"`` (fp32 tensors on a CPU with AMX-BF16, memopt's native library built): memopt's
  own AMX kernel (``memopt.offload.cpu_gemm``): the operands are rounded to bf16 while they
  are packed into tiles, the products are summed in fp32, and the write-back keeps its fused
  form (``W = beta W + alpha P L`` in one call). Same arithmetic as ``"fpmath"`` below, at a
  fraction of its time on projection shapes (K = 128..4096, one side the rank), where oneDNN
  spends most of its time outside the tiles: ``benchmarks/gemm_route.py``.
- ``"fpmath"`` (fp32 tensors on the CPU, torch >= 2.9, no native kernel): the GEMMs stay fp32
  in and out and run through oneDNN with its bf16 math mode allowed (``torch.backends.mkldnn.
  matmul.fp32_precision = "bf16"``, set only around memopt's own GEMMs and restored after).
  oneDNN may then round the inputs to bf16 inside the kernel where that is fast (AMX); no cast
  passes, and the write-back keeps its fused ``addmm_``. On CPUs where torch's default fp32
  GEMM is MKL's generic path (AMD EPYC here) this also moves the GEMMs onto oneDNN's AVX-512
  kernels, which is where most of the gain comes from: measured on the 2-core EPYC,
  379-440 GFLOP/s against 185-190 (benchmarks/gemm_route.py), at fp32 accuracy. On an
  AMX Xeon it does round to bf16 (relative error 2.3e-3) and runs 2.7-3.8x the default.
- ``"cast"`` (elsewhere: GPUs, or a torch without that knob): the GEMMs run on bf16 copies
  of the gradient, the basis and the low-rank direction (fp32 accumulation inside the GEMM),
  the projected gradient comes back in the gradient's dtype and the update is added to the
  parameter in its own dtype. Relative rounding 2^-9 of the projected gradient and update.

Only fp32 operands are affected: bf16 parameters already run bf16 GEMMs, and fp16 ones
would lose mantissa bits. ``MEMOPT_MATMUL_ROUTE`` picks a CPU route by name (``auto``, the
default: native, else fpmath, else cast; or ``native``, ``fpmath``, ``cast``), e.g. to
reproduce a GPU run's rounding on a CPU, or to compare the routes (benchmarks/convergence.py).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Literal

import torch
from torch import Tensor

from memopt._utils import warn_once
from memopt._utils.env import getenv_fast
from memopt.offload import cpu_gemm

MATMUL_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16}
Route = Literal["native", "fpmath", "cast"] | None
ENV_ROUTE = "MEMOPT_MATMUL_ROUTE"
_CPU_ROUTES = ("auto", "native", "fpmath", "cast")


@functools.cache
def fpmath_available() -> bool:
    """Whether this torch has oneDNN and its fp32-precision knob for CPU matmuls."""
    mkldnn = torch.backends.mkldnn
    return bool(mkldnn.is_available()) and hasattr(mkldnn, "matmul")


@functools.cache
def cpu_has_bf16_gemm() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def route(x: Tensor, matmul_dtype: str | None) -> Route:
    """How GEMMs on ``x`` (an operand or the output) run under ``matmul_dtype``."""
    if matmul_dtype is None or x.dtype != torch.float32:
        return None
    if x.device.type != "cpu":
        return "cast"
    forced = getenv_fast(ENV_ROUTE, "auto")
    if forced not in _CPU_ROUTES:
        raise ValueError(f"{ENV_ROUTE} must be one of {', '.join(_CPU_ROUTES)}; got {forced!r}")
    if forced in ("auto", "native") and cpu_gemm.available():
        return "native"
    if forced == "native":
        warn_once(
            f"{ENV_ROUTE}=native: memopt's AMX bf16 GEMM is not usable here (no AMX-BF16, or "
            "the native library is not built); using the next route"
        )
    if forced != "cast" and fpmath_available():
        return "fpmath"
    if not cpu_has_bf16_gemm():
        warn_once(
            "matmul_dtype='bfloat16': this CPU has no native bf16 dot products (AVX512-BF16 "
            "or AMX) and this torch has no oneDNN fp32-precision knob, so the bf16 GEMMs "
            "are emulated and slower than fp32; drop the option here"
        )
    return "cast"


class cpu_bf16_fpmath:  # noqa: N801 - used as a context manager, like contextlib's
    """fp32 CPU matmuls inside go through oneDNN with bf16 math allowed; restored after.

    A plain class rather than ``@contextmanager``: it is entered around every projection
    GEMM, and the generator machinery cost more than setting the knob.
    """

    __slots__ = ("_before",)

    def __enter__(self) -> None:
        knob: Any = getattr(torch.backends.mkldnn, "matmul")  # noqa: B009 - torch >= 2.9 only
        self._before = knob.fp32_precision
        if self._before != "bf16":
            knob.fp32_precision = "bf16"

    def __exit__(self, *exc: object) -> None:
        if self._before != "bf16":
            knob: Any = getattr(torch.backends.mkldnn, "matmul")  # noqa: B009
            knob.fp32_precision = self._before


def gemm_context(r: Route) -> contextlib.AbstractContextManager[None]:
    """Around torch GEMMs of route ``r``. The native route's odd operands (a strided output,
    a stacked batch) run here too: on oneDNN's bf16 math where this torch has the knob,
    else as plain fp32 GEMMs."""
    if r == "fpmath" or r == "native" and fpmath_available():
        return cpu_bf16_fpmath()
    return contextlib.nullcontext()


def mm(r: Route, a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` on route ``r`` (operands already cast where the route is ``cast``; on the
    native route, 2-D fp32 CPU operands, which the callers check)."""
    if r == "native":
        return cpu_gemm.mm(a, b)
    with gemm_context(r):
        return a @ b


def addmm_(r: Route, out: Tensor, a: Tensor, b: Tensor, *, alpha: float, beta: float) -> None:
    """``out = beta * out + alpha * a @ b`` on route ``r`` (2-D fp32 operands and output)."""
    if r == "native" and (out.shape[1] < 2 or out.stride(1) == 1):
        cpu_gemm.addmm_(out, a, b, alpha=alpha, beta=beta)
        return
    with gemm_context(r):
        out.addmm_(a, b, beta=beta, alpha=alpha)
