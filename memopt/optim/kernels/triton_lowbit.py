"""Triton kernel: one AdamW step on 8-bit block-quantized moments, in one pass over memory.

``adamw_q8`` reads each element's parameter, gradient and the two uint8 moment codes once,
and writes the parameter and the two codes once (plus one fp32 absmax per moment per
256-element block): 16 bytes per element with fp32 parameters, 10 with bf16/fp16, where
the eager path (dequantize, fused Adam, quantize) makes a dozen passes with fp32
temporaries. One program owns ``BLOCKS`` whole quantization blocks, a ``[BLOCKS, QBLOCK]``
tile, so the per-block absmax is a row reduction in registers. The kernel is bound by its
table gathers more than by memory: about 2 TB/s of the H100's 3 (see ``lowbit_adam``).

Per tile:

1. dequantize: ``m = code_m[q_m] * absmax_m`` (a gather from the 256-entry fp32 map), the
   same for v (``FIRST``: the moments start at zero and nothing is read);
2. the Adam step in fp32, written as torch's CPU fused AdamW computes it (see
   ``lowbit_adam`` for the exact form and why), every rounding explicit: ``tl.fma`` where
   torch fuses, correctly rounded ``div_rn`` / ``sqrt_rn`` (not the GPU's approximate
   ones), and the caller launches with ``enable_fp_fusion=False`` so the compiler adds no
   fma of its own;
3. per row: ``absmax = max |m|`` (``max v`` after ``v = max(v, 0)``), NaN if the block holds
   one, as ``torch.amax`` gives;
4. re-quantize: ``y = m / absmax`` (a zero block divides by 1), then the index of the
   nearest code with ties to the lower one, ``count(midpoints < y)``, against the same 255
   fp32 midpoints that ``quant.nearest_index`` uses, so the codes are the torch path's
   exactly. The count is a lookup and a short search: the top bits of y's float32 pattern
   (sign, exponent, a few mantissa bits) select a cell, a contiguous range of floats; a
   table gives the number of midpoints below the cell, and a branchless binary search of
   ``STEPS`` (2 or 3) gathers counts those inside it. A plain 8-step search over the
   midpoints gives the same codes; its 8 dependent gathers from a 1 KiB table cost about a
   third of the kernel's time on an H100.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _nearest(y, mid_ptr, base_ptr, KEY_SHIFT: tl.constexpr, STEPS: tl.constexpr):
    """uint8 index of the nearest code: the number of midpoints below y.

    ``base[key]`` counts the midpoints below the key's float cell; the few inside the cell
    (at most ``2**STEPS - 1``) are counted by a ``STEPS``-step binary search from there.
    """
    key = y.to(tl.uint32, bitcast=True) >> KEY_SHIFT
    pos = tl.load(base_ptr + key).to(tl.int32)
    for i in tl.static_range(STEPS):  # steps of 2**(STEPS-1), ..., 1
        mid = tl.load(mid_ptr + pos + ((1 << (STEPS - 1 - i)) - 1))
        pos += tl.where(mid < y, 1 << (STEPS - 1 - i), 0)
    return pos.to(tl.uint8)


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 rounding to nearest even, in integer ops (the interpreter truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    out = tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)
    return out.to(tl.bfloat16, bitcast=True)


@triton.jit
def _row_absmax(x, mask):
    """Per-row max |x| over the valid elements, NaN when a valid element is NaN."""
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
    bad = tl.max(tl.where(mask & (x != x), 1, 0), axis=1)
    return tl.where(bad > 0, float("nan"), amax)


@triton.jit
def _dequant(q_ptr, absmax_ptr, code_ptr, offs, rows, mask, rmask):
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + rows, mask=rmask, other=0.0)
    return tl.where(mask, tl.load(code_ptr + q) * scale[:, None], 0.0)  # zero padding lanes


@triton.jit
def _requant(
    x,
    q_ptr,
    absmax_ptr,
    mid_ptr,
    base_ptr,
    offs,
    rows,
    mask,
    rmask,
    KEY_SHIFT: tl.constexpr,
    STEPS: tl.constexpr,
):
    amax = _row_absmax(x, mask)
    tl.store(absmax_ptr + rows, amax, mask=rmask)
    y = tl.div_rn(x, tl.where(amax > 0.0, amax, 1.0)[:, None])
    tl.store(q_ptr + offs, _nearest(y, mid_ptr, base_ptr, KEY_SHIFT, STEPS), mask=mask)


@triton.jit
def adamw_q8(
    p_ptr,
    g_ptr,
    mq_ptr,
    mabs_ptr,
    vq_ptr,
    vabs_ptr,
    mcode_ptr,
    vcode_ptr,
    mmid_ptr,
    vmid_ptr,
    mbase_ptr,
    vbase_ptr,
    n,
    keep_pre,
    keep_post,
    lerp_w,
    c2,
    b2,
    step_size,
    bc2_sqrt,
    eps,
    FIRST: tl.constexpr,
    LERP_FROM_G: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    STEPS_M: tl.constexpr,
    STEPS_V: tl.constexpr,
    BLOCKS: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offs < n
    rmask = rows * QBLOCK < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        m = tl.zeros([BLOCKS, QBLOCK], dtype=tl.float32)
        v = tl.zeros([BLOCKS, QBLOCK], dtype=tl.float32)
    else:
        m = _dequant(mq_ptr, mabs_ptr, mcode_ptr, offs, rows, mask, rmask)
        v = _dequant(vq_ptr, vabs_ptr, vcode_ptr, offs, rows, mask, rmask)
    p = p * keep_pre  # torch form: decoupled decay before the update (1.0: none)
    if LERP_FROM_G:  # m.lerp_(g, 1 - b1) as torch computes it, for either size of weight
        m = tl.fma(lerp_w, g - m, g)
    else:
        m = tl.fma(lerp_w, g - m, m)
    v = tl.fma(g * c2, g, v * b2)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    p = p * keep_post  # galore form: decay after the update (1.0: none)
    if p_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(p_ptr + offs, _bf16_rne(p), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    _requant(m, mq_ptr, mabs_ptr, mmid_ptr, mbase_ptr, offs, rows, mask, rmask, KEY_SHIFT, STEPS_M)
    v = tl.where(v < 0.0, 0.0, v)  # v.clamp_(min=0), NaN kept
    _requant(v, vq_ptr, vabs_ptr, vmid_ptr, vbase_ptr, offs, rows, mask, rmask, KEY_SHIFT, STEPS_V)
