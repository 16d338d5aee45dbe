"""Triton kernels for the elementwise part of memopt's low-rank updates.

Imported only when Triton is present and a kernel is asked for (CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1`` in the tests). Each kernel makes one pass over its
tensors where eager torch makes five to eight:

- ``adam_channels``: reads the projected gradient R and the moments once; writes m, v
  and the direction N = m / (sqrt(v) + eps) (either eps placement), and optionally the
  per-channel sums of N^2 and R^2 that APOLLO's scaling needs. One program per channel
  (a row of a right projection, a column of a left one), looping over the channel.
- ``adam_cols``: the same with the channels along columns (a left projection), in
  row-contiguous tiles.
- ``scaled_update``: W <- keep * W + alpha * G * f, with f a scalar, a column (one factor
  per row) or a row (one per column): APOLLO's whole write-back, decay included, in one
  pass over W and G. ``alpha`` is read from device memory, so the norm-growth limiter
  never forces a host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _adam_at(
    low_ptr, m_ptr, v_ptr, out_ptr, idx, mask, b1, b2, eps, inv_sqrt_bc2, TORCH_EPS: tl.constexpr
):
    """Adam's moment update and direction at ``idx``: writes m, v and N; returns (g, N)."""
    g = tl.load(low_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + idx, v.to(v_ptr.dtype.element_ty), mask=mask)
    if TORCH_EPS:
        d = m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    else:
        d = m / (tl.sqrt(v) + eps)
    tl.store(out_ptr + idx, d.to(out_ptr.dtype.element_ty), mask=mask)
    return g, d


@triton.jit
def adam_channels(
    low_ptr,
    m_ptr,
    v_ptr,
    out_ptr,
    num_ptr,
    den_ptr,
    n_inner,
    stride_ch,
    stride_in,
    b1,
    b2,
    eps,
    inv_sqrt_bc2,
    TORCH_EPS: tl.constexpr,
    NORMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    ch = tl.program_id(0)
    base = ch * stride_ch
    acc_num = tl.zeros([BLOCK], dtype=tl.float32)
    acc_den = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_inner, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_inner
        idx = base + offs * stride_in
        g, d = _adam_at(low_ptr, m_ptr, v_ptr, out_ptr, idx, mask, b1, b2, eps, inv_sqrt_bc2,
                        TORCH_EPS)
        if NORMS:
            acc_num += tl.where(mask, d * d, 0.0)
            acc_den += tl.where(mask, g * g, 0.0)
    if NORMS:
        tl.store(num_ptr + ch, tl.sum(acc_num, axis=0))
        tl.store(den_ptr + ch, tl.sum(acc_den, axis=0))


@triton.jit
def adam_cols(
    low_ptr,
    m_ptr,
    v_ptr,
    out_ptr,
    num_ptr,
    den_ptr,
    n_rows,
    n_cols,
    b1,
    b2,
    eps,
    inv_sqrt_bc2,
    TORCH_EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # adam_channels with the channels along columns of a row-major tensor: one program per
    # BLOCK_C columns walks down the rows in [BLOCK_R, BLOCK_C] tiles, so each load is
    # contiguous along a row instead of a stride-n gather per element.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    acc_num = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_den = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < n_rows) & cmask[None, :]
        idx = rows[:, None] * n_cols + cols[None, :]
        g, d = _adam_at(low_ptr, m_ptr, v_ptr, out_ptr, idx, mask, b1, b2, eps, inv_sqrt_bc2,
                        TORCH_EPS)
        acc_num += tl.sum(tl.where(mask, d * d, 0.0), axis=0)
        acc_den += tl.sum(tl.where(mask, g * g, 0.0), axis=0)
    tl.store(num_ptr + cols, acc_num, mask=cmask)
    tl.store(den_ptr + cols, acc_den, mask=cmask)


@triton.jit
def scaled_update(
    w_ptr,
    g_ptr,
    f_ptr,
    alpha_ptr,
    n_cols,
    stride_w,
    stride_g,
    keep,
    F_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    w = tl.load(w_ptr + row * stride_w + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    if F_MODE == 0:  # one factor for the whole tensor
        f = tl.load(f_ptr).to(tl.float32)
    elif F_MODE == 1:  # one factor per row
        f = tl.load(f_ptr + row).to(tl.float32)
    else:  # one factor per column
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    w = keep * w + alpha * g * f
    tl.store(w_ptr + row * stride_w + offs, w.to(w_ptr.dtype.element_ty), mask=mask)
