"""Reduced-precision projection GEMMs: the ``matmul_dtype="bfloat16"`` option.

Two routes, picked per operand (``route``):

- ``"fpmath"`` (fp32 tensors on the CPU, torch >= 2.9): the GEMMs stay fp32 in and out and
  run through oneDNN with its bf16 math mode allowed (``torch.backends.mkldnn.matmul.
  fp32_precision = "bf16"``, set only around memopt's own GEMMs and restored after). oneDNN
  may then round the inputs to bf16 inside the kernel where that is fast (AMX); no cast
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
would lose mantissa bits. ``MEMOPT_MATMUL_ROUTE=cast`` forces the cast route on the CPU too
(to reproduce a GPU run's rounding on a CPU, or to measure it: benchmarks/convergence.py).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Literal

import torch
from torch import Tensor

from memopt._utils import warn_once
from memopt._utils.env import getenv_fast

MATMUL_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16}
Route = Literal["fpmath", "cast"] | None
ENV_ROUTE = "MEMOPT_MATMUL_ROUTE"


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
    if x.device.type == "cpu":
        forced = getenv_fast(ENV_ROUTE, "auto")
        if forced not in ("auto", "cast"):
            raise ValueError(f"{ENV_ROUTE} must be 'auto' or 'cast', got {forced!r}")
        if forced == "auto" and fpmath_available():
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
    return cpu_bf16_fpmath() if r == "fpmath" else contextlib.nullcontext()
