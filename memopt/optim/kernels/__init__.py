"""Kernel dispatch for the elementwise parts of the low-rank updates.

``MEMOPT_KERNELS`` selects the backend: ``auto`` (default: Triton for CUDA tensors when
Triton is installed; for fp32 CPU tensors the native one-pass Adam of
``memopt.offload.cpu_lowrank`` when the native library is built; torch otherwise), ``torch``
or ``triton`` (forced; on CPU tensors Triton needs ``TRITON_INTERPRET=1``, which is how the
tests check the kernels without a GPU). The torch path is the reference the kernels are
tested against.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Literal

import torch
from torch import Tensor

from memopt._utils.env import getenv_fast
from memopt._utils.native import mark_written
from memopt.offload import cpu_lowrank
from memopt.offload.cpu_adam import native_available
from memopt.optim import _functional as F

_TRITON = importlib.util.find_spec("triton") is not None
BLOCK = 256
ROW_BLOCK, COL_BLOCK = 32, 64  # adam_cols tiles


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_MODES = ("auto", "torch", "triton")


def _env_mode() -> str:
    """``MEMOPT_KERNELS``, checked (every path reads it: AdamW and the offloaded optimizer too,
    not only the low-rank ones); surrounding spaces and case are forgiven."""
    # Called twice per parameter per step: see memopt._utils.env for why not os.environ.get.
    mode = getenv_fast("MEMOPT_KERNELS", "auto")
    if mode in _MODES:
        return mode
    if mode.strip().lower() in _MODES:
        return mode.strip().lower()
    raise ValueError(f"MEMOPT_KERNELS must be auto, torch or triton, got {mode!r}")


def backend(t: Tensor) -> Literal["torch", "triton"]:
    mode = _env_mode()
    if mode == "triton" and not _TRITON:
        raise RuntimeError("MEMOPT_KERNELS=triton but Triton is not installed (pip install triton)")
    if mode == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"MEMOPT_KERNELS=triton on a {t.device.type} tensor: Triton compiles for GPUs; on "
            "the CPU it runs only under its interpreter (TRITON_INTERPRET=1, set before "
            "importing triton: a test/debug mode). Use MEMOPT_KERNELS=auto on the CPU"
        )
    if mode == "triton" or (mode == "auto" and _TRITON and t.is_cuda):
        return "triton"
    return "torch"


def native_cpu_on() -> bool:
    """``MEMOPT_KERNELS=auto`` (``torch`` forces the torch reference) and the native CPU
    library loaded: the switch every native CPU kernel checks."""
    return _env_mode() == "auto" and native_available()


def _native_cpu(*ts: Tensor) -> bool:
    """The native CPU kernels apply: ``MEMOPT_KERNELS=auto`` (``torch`` forces the torch
    reference), CPU fp32 contiguous tensors, and the native library built."""
    return ts[0].device.type == "cpu" and native_cpu_on() and cpu_lowrank.usable(*ts)


def _tk() -> Any:
    from memopt.optim.kernels import triton_kernels

    return triton_kernels


def adam_update(
    low: Tensor,
    m: Tensor,
    v: Tensor,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    lr: float,
    eps_mode: F.EpsMode,
    correct_bias: bool = True,
    norms_dim: int | None = None,
) -> tuple[Tensor, float, Tensor | None, Tensor | None]:
    """Adam moments of ``low`` and the direction, in one pass on the Triton backend.

    Returns ``(direction, step_size, num, den)``; with ``norms_dim`` (0 or 1), ``num`` and
    ``den`` are the squared norms of the direction and of ``low`` along that dim
    (APOLLO's channels), else None.
    """
    bc1, bc2 = F.bias_corrections(step, beta1, beta2, correct_bias)
    step_size = F.adam_step_size(lr, bc1, bc2, eps_mode)
    if low.dim() == 2 and _native_cpu(low, m, v):
        c2 = 1.0 / math.sqrt(bc2) if eps_mode == "torch" else 1.0
        d, num, den = cpu_lowrank.lowrank_adam(
            low, m, v, beta1=beta1, beta2=beta2, eps=eps, c2=c2, norms_dim=norms_dim
        )
        return d, step_size, num, den
    if backend(low) == "torch" or low.dim() != 2 or not low.is_contiguous():
        # fp16 moments: the update runs in fp32 (as torch's fused Adam does) and is stored
        # back. In fp16 itself eps (1e-8 for torch's placement) rounds to zero and small
        # second moments underflow, so m / (sqrt(v) + eps) divided by zero.
        half = m.dtype == torch.float16
        mw, vw, x = (m.float(), v.float(), low.float()) if half else (m, v, low)
        F.adam_moments_(mw, vw, x, beta1, beta2)
        if half:
            m.copy_(mw)
            v.copy_(vw)
        d, step_size = F.adam_direction(
            mw,
            vw,
            step=step,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            lr=lr,
            eps_mode=eps_mode,
            correct_bias=correct_bias,
        )
        d = d.to(low.dtype) if half else d
        if norms_dim is None:
            return d, step_size, None, None
        num = d.float().square().sum(dim=norms_dim)
        return d, step_size, num, low.float().square().sum(dim=norms_dim)
    rows, cols = low.shape
    out = torch.empty_like(low)
    n_ch = cols if norms_dim == 0 else rows
    num = torch.empty(n_ch, device=low.device, dtype=torch.float32)
    den = torch.empty(n_ch, device=low.device, dtype=torch.float32)
    inv_sqrt_bc2 = 1.0 / math.sqrt(bc2)
    if norms_dim == 0:  # channels are columns: tiles that stay contiguous along rows
        _tk().adam_cols[(triton_cdiv(cols, COL_BLOCK),)](
            low, m, v, out, num, den, rows, cols, beta1, beta2, eps, inv_sqrt_bc2,
            TORCH_EPS=eps_mode == "torch", BLOCK_R=ROW_BLOCK, BLOCK_C=COL_BLOCK,
        )  # fmt: skip
        mark_written(m, v)
        return out, step_size, num, den
    _tk().adam_channels[(rows,)](
        low, m, v, out, num, den, cols, cols, 1, beta1, beta2, eps, inv_sqrt_bc2,
        TORCH_EPS=eps_mode == "torch", NORMS=norms_dim is not None,
        BLOCK=min(BLOCK, max(16, 1 << (cols - 1).bit_length())),
    )  # fmt: skip
    mark_written(m, v)
    if norms_dim is None:
        return out, step_size, None, None
    return out, step_size, num, den


def channel_norms(g: Tensor, dim: int) -> Tensor:
    """The 2-norm of each row (``dim=1``) or each column (``dim=0``) of a 2-D ``g``.

    On fp32 CPU tensors with the native library: one pass at memory speed in either
    direction (``cpu_lowrank.channel_sumsq``); torch's ``vector_norm`` elsewhere.
    """
    if (
        g.dim() == 2
        and g.device.type == "cpu"
        and g.dtype == torch.float32
        and g.is_contiguous()  # (an expanded gradient has row stride 0)
        and native_cpu_on()
    ):
        return cpu_lowrank.channel_sumsq(g, dim).sqrt_()
    return torch.linalg.vector_norm(g, dim=dim)


def scaled_update_(
    w: Tensor, g: Tensor, factor: Tensor, alpha: float | Tensor, keep: float | Tensor
) -> None:
    """w <- keep * w + alpha * g * factor (factor 0-d, a column (m, 1) or a row (1, n)).

    ``alpha`` may be a 0-d device tensor (read on the device: no host sync).
    """
    if backend(w) == "torch" or w.stride(1) != 1 or g.stride(1) != 1:
        if keep != 1.0 and F.is_half(w):
            _decay_and_update_fp32(w, g, factor, alpha, keep)
            return
        if keep != 1.0:
            w.mul_(keep)
        if w.dtype == torch.float16:
            # fp16: alpha * factor folded in fp32 first; the factor alone (||N|| / ||R||
            # per channel) can exceed fp16's range although the update does not
            f, alpha = (factor.float() * alpha).to(w.dtype), 1.0
        else:
            f = factor.to(w.dtype)
            if isinstance(alpha, Tensor):
                f, alpha = f * alpha.to(w.dtype), 1.0
        # One pass for every factor shape (a 0-d factor broadcasts too): no G-sized
        # temporary, which for tensor-wise scaling cost more than the update itself.
        w.addcmul_(g.to(w.dtype), f, value=alpha)
        return
    rows, cols = w.shape
    if factor.dim() == 0:
        mode = 0  # tensor-wise
    elif factor.shape[-1] == 1 and factor.shape[0] == rows:
        mode = 1  # a column: one factor per row
    else:
        mode = 2  # a row: one factor per column
    if isinstance(alpha, Tensor):
        alpha_t = alpha.float().contiguous()
    else:
        alpha_t = torch.full((), alpha, device=w.device, dtype=torch.float32)
    if isinstance(keep, Tensor):  # (a tensor lr set on the group: the kernel takes a scalar)
        keep = float(keep)
    grid = (rows, (cols + BLOCK - 1) // BLOCK)
    _tk().scaled_update[grid](
        w,
        g,
        factor.contiguous().float(),
        alpha_t,
        cols,
        w.stride(0),
        g.stride(0),
        keep,
        F_MODE=mode,
        BLOCK=BLOCK,
    )
    mark_written(w)


def _decay_and_update_fp32(
    w: Tensor, g: Tensor, factor: Tensor, alpha: float | Tensor, keep: float | Tensor
) -> None:
    """``scaled_update_`` for a bf16 / fp16 ``w`` with decay: ``keep * w + alpha * g * factor``
    summed in fp32 and rounded once, as the Triton kernel does. Applied as its own multiply,
    a decay below half an ulp of ``w`` would round back to ``w`` every step."""
    f = factor.float()
    if isinstance(alpha, Tensor):
        f, alpha = f * alpha.float(), 1.0
    with F.fp32_work(w) as work:
        work.mul_(keep).addcmul_(g, f, value=alpha)
