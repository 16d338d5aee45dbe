"""Block-wise quantization of optimizer state to 8 or 4 bits (pure torch, any device).

Algorithm (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):

1. Flatten x and cut it into blocks of ``block_size`` elements (the last may be short).
2. Per block, ``absmax = max |x|``; normalize ``y = x / absmax`` into [-1, 1] (a zero
   block divides by 1). Division, not a reciprocal multiply, so the block's largest
   element maps to exactly 1.0.
3. Each y becomes the index of the nearest value of a sorted *code* (ties go to the lower
   value): ``count(midpoints < y)``, which is ``torch.bucketize`` on the code's midpoints.
4. Store the uint8 indices (two per byte for 4 bits: first element in the high nibble)
   and the float32 absmax per block. Dequantization is ``code[index] * absmax``.

Codes. ``dynamic_map`` is the dynamic tree code: after the sign bit (signed maps only),
a run of E zero bits gives the decimal exponent 10^-E, a one bit ends the run, and the
F bits left are a linear fraction in (0.1, 1]: ``10^-E * (0.1 + 0.9 (k + 1) / 2^F)``.
All-zero is 0; 0 and +-1 are exact; the decades tile (10^-(E_max+1), 1]. The signed map's
redundant negative zero encodes one more decade, +10^-(bits-1), so all 2**bits values
differ. ``linear_map`` is a uniform code.

Speed. ``torch.bucketize`` is slow on CPU (~70 ns per element), so nearest-index search
uses a 65536-entry table keyed by the top 16 bits of the float32 y (sign, exponent and 7
mantissa bits). When every key's float range holds at most one midpoint (true for all
maps here), ``index = table_index[key] + (y > table_midpoint[key])`` equals bucketize
exactly; otherwise it falls back to bucketize. Tables are built once per code tensor.
Work runs in chunks of whole blocks (2^18 elements on CPU, 2^24 elsewhere): temporaries
(~17 bytes per element) stay bounded, and on CPU they stay in cache.

Native CPU path: for int8 state on the CPU, ``quantize_blockwise`` and
``dequantize_blockwise`` hand the work to ``native`` (same results, bit for bit).

State helpers (``quantize_state`` / ``dequantize_state``) hold tensors only; codes are
module constants cached per (kind, signed, device). The unsigned state (Adam's second
moment) uses codes without zero: a second moment rounded to zero while its first moment is
not turns ``m / (sqrt(v) + eps)`` into ``m / eps``. 4-bit: a linear code without zero, as
torchao and Li et al. 2023 do; 8-bit: the dynamic tree code whose all-zero pattern is 10^-8
instead of 0, so v / absmax below 5.5e-8 (a rare token's embedding row in a block with a
frequent one) dequantizes to 1e-8 absmax, not 0. (With zero, a tiny LLaMA's embedding moved
0.92 in 8 steps at lr 1e-3, 150x the fp32 run's 0.006; found in session 12.) All of it is
deterministic: resume re-quantizes bit-exactly.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from memopt.optim.lowbit import native

QuantKind = Literal["int8", "int4"]
KIND_BITS: dict[str, int] = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE: dict[int, int] = {8: 256, 4: 128}  # torchao's block sizes

_KEY_BITS = 16  # table key: top 16 bits of a float32
_CPU_CHUNK = 1 << 18  # elements per pass on CPU: temporaries stay in cache, no page faults
_DEVICE_CHUNK = 1 << 24  # elsewhere: bounds the ~17 bytes/element of temporaries
_Tables = tuple[Tensor, Tensor]  # (uint8 index, float32 midpoint) per key
_MAPS: dict[tuple[str, bool, int, torch.device], Tensor] = {}
_TABLES: dict[int, tuple[weakref.ref[Tensor], int, _Tables | None]] = {}


def dynamic_map(signed: bool, bits: int = 8, *, zero: bool = True) -> Tensor:
    """Dynamic tree code: ``2**bits`` float32 values in [-1, 1] (or [0, 1]), ascending.

    ``zero=False`` (unsigned only): the all-zero pattern encodes one more decade,
    ``10^-bits``, instead of 0 (the second-moment code: see the module docstring)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"dynamic_map: bits={bits} must be in [2, 8]")
    if signed and not zero:
        raise ValueError("dynamic_map: zero=False is for unsigned codes")
    tree = bits - 1 if signed else bits  # bits after the sign
    mags = [0.0 if zero else 10.0**-tree]
    for e in range(tree):  # e zero bits, the indicator bit, then f fraction bits
        n = 2 ** (tree - 1 - e)
        # 10^-e (0.1 + 0.9 (k + 1) / n) as one correctly rounded division: k = n - 1 gives 1.
        mags += [(n + 9 * (k + 1)) / (10 * n * 10**e) for k in range(n)]
    values = [-m for m in mags[1:]] + mags + [10.0**-tree] if signed else mags
    return torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)


def linear_map(signed: bool, bits: int = 8, *, zero: bool = True) -> Tensor:
    """Uniform code, float32 ascending; 0 and +-1 exact.

    Signed: ``k / (2**(bits-1) - 1)`` for |k| <= 2**(bits-1) - 1 (``2**bits - 1`` values,
    symmetric). Unsigned: ``k / (2**bits - 1)``, or with ``zero=False`` ``k / 2**bits``
    for k = 1..2**bits (no zero; torchao's 4-bit second-moment code).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"linear_map: bits={bits} must be in [2, 8]")
    half, full = 2 ** (bits - 1) - 1, 2**bits
    lo, hi, n = (
        (-half, half, half) if signed else (0, full - 1, full - 1) if zero else (1, full, full)
    )
    return torch.arange(lo, hi + 1, dtype=torch.float64).div(n).to(torch.float32)


def state_code(kind: QuantKind, signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The (cached, shared: do not modify) code that ``quantize_state`` uses for ``kind``."""
    bits = _kind_bits(kind)
    name = "dynamic" if signed else "linear0" if bits == 4 else "dynamic0"
    key = (name, signed, bits, torch.device(device))
    code = _MAPS.get(key)
    if code is None:
        cpu = (
            linear_map(False, bits, zero=False)
            if name == "linear0"
            else dynamic_map(signed, bits, zero=name == "dynamic")
        )
        code = _MAPS[key] = cpu.to(key[3])
    return code


def _kind_bits(kind: str) -> int:
    if kind not in KIND_BITS:
        raise ValueError(f"kind={kind!r} must be one of {sorted(KIND_BITS)}")
    return KIND_BITS[kind]


def _build_tables(code: Tensor) -> _Tables | None:
    """Per-key (lower index, next midpoint) tables, or None when a key spans 2+ midpoints."""
    if code.dim() != 1 or code.dtype != torch.float32 or code.numel() < 2:
        raise ValueError(f"code must be a 1-D float32 tensor of >= 2 values, got {code!r}")
    if not bool((code[1:] > code[:-1]).all()):
        raise ValueError("code must be sorted strictly ascending")
    mids = (code[:-1] + code[1:]) / 2
    keys = torch.arange(-(2 ** (_KEY_BITS - 1)), 2 ** (_KEY_BITS - 1), device=code.device)
    lo = (keys.to(torch.int32) << (32 - _KEY_BITS)).view(torch.float32)
    hi = ((keys << (32 - _KEY_BITS)) + (2 ** (32 - _KEY_BITS) - 1)).to(torch.int32)
    hi = hi.view(torch.float32)
    cell_min, cell_max = torch.minimum(lo, hi), torch.maximum(lo, hi)
    first = torch.bucketize(cell_min, mids)
    span = torch.bucketize(cell_max, mids) - first
    finite = cell_min.isfinite() & cell_max.isfinite()
    if bool((span[finite] > 1).any()):
        return None
    # Entry i belongs to key i - 32768 (arange order); +inf past the last midpoint.
    padded = torch.cat([mids, mids.new_full((1,), math.inf)])
    return first.to(torch.uint8), padded[first.clamp(max=mids.numel())]


def _tables(code: Tensor) -> _Tables | None:
    """Tables for ``code``, cached per live tensor and invalidated by in-place edits."""
    key = id(code)
    entry = _TABLES.get(key)
    if entry is not None and entry[0]() is code and entry[1] == code._version:
        return entry[2]
    tables = _build_tables(code)

    def forget(_ref: weakref.ref[Tensor]) -> None:
        _TABLES.pop(key, None)

    _TABLES[key] = (weakref.ref(code, forget), code._version, tables)
    return tables


def nearest_index(
    y: Tensor,
    code: Tensor,
    method: Literal["auto", "bucketize"] = "auto",
    *,
    out: Tensor | None = None,
) -> Tensor:
    """uint8 index of the nearest ``code`` value to each float32 y (ties to the lower one)."""
    if code.numel() > 256:
        raise ValueError(f"code has {code.numel()} values; at most 256 fit in uint8")
    if y.dtype != torch.float32 or code.device != y.device:
        raise ValueError(f"y must be float32 on the code's device ({y.dtype}, {y.device})")
    y = y.contiguous()
    tables = _tables(code) if method == "auto" else None
    if out is None:
        out = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
    if tables is None:
        out.copy_(torch.bucketize(y, (code[:-1] + code[1:]) / 2, out_int32=True))
        return out
    index, mid = tables
    key = torch.bitwise_right_shift(y.view(torch.int32), 32 - _KEY_BITS)
    key += 2 ** (_KEY_BITS - 1)
    torch.index_select(index, 0, key.view(-1), out=out.view(-1))
    out += y > mid.index_select(0, key.view(-1)).view(y.shape)
    return out


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack uint8 codes in [0, 16) two per byte (first in the high nibble); pads odd length."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor, numel: int | None = None) -> Tensor:
    """Inverse of ``pack_nibbles``: the first ``numel`` codes (all of them by default)."""
    out = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)
    return out if numel is None else out[:numel]


def _check(bits: int, block_size: int | None) -> int:
    if bits not in DEFAULT_BLOCK_SIZE:
        raise ValueError(f"bits={bits} must be 8 or 4")
    bs = DEFAULT_BLOCK_SIZE[bits] if block_size is None else int(block_size)
    if bs < 1:
        raise ValueError(f"block_size={block_size} must be a positive integer")
    return bs


def _chunk(device: torch.device, block_size: int) -> int:
    """Elements per pass: whole blocks, an even count (nibble pairs), at least one block."""
    target = _CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK
    return max(1, target // (2 * block_size)) * 2 * block_size


def quantize_blockwise(
    x: Tensor, code: Tensor, block_size: int | None = None, *, bits: int = 8
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` against ``code``: (uint8 codes, float32 absmax per block).

    8 bits: one code per element (``x.numel()`` bytes). 4 bits: two per byte
    (``ceil(numel / 2)`` bytes). ``block_size`` defaults to 256 (8 bits) / 128 (4 bits).
    A block holding inf or NaN dequantizes to non-finite values (its absmax is not finite).
    """
    bs = _check(bits, block_size)
    if code.numel() > 2**bits:
        raise ValueError(f"code has {code.numel()} values; {bits} bits hold {2**bits}")
    native_out = native.quantize(x, code, bs, bits)
    if native_out is not None:
        return native_out
    flat = x.detach().reshape(-1)
    n = flat.numel()
    absmax = torch.empty(-(-n // bs), dtype=torch.float32, device=x.device)
    codes = torch.empty(-(-n // 2) if bits == 4 else n, dtype=torch.uint8, device=x.device)
    step = _chunk(x.device, bs)
    for start in range(0, n, step):
        part = flat[start : start + step].to(torch.float32)
        m = part.numel()
        if m % bs:  # short last block: zero padding leaves its absmax unchanged
            part = torch.nn.functional.pad(part, (0, bs - m % bs))
        rows = part.view(-1, bs)
        amax = rows.abs().amax(dim=1)
        absmax[start // bs : start // bs + rows.shape[0]] = amax
        y = (rows / torch.where(amax > 0, amax, 1.0)[:, None]).view(-1)[:m]
        if bits == 4:
            codes[start // 2 : start // 2 + (m + 1) // 2] = pack_nibbles(nearest_index(y, code))
        else:
            nearest_index(y, code, out=codes[start : start + m])
    return codes, absmax


def dequantize_blockwise(
    codes: Tensor,
    absmax: Tensor,
    code: Tensor,
    block_size: int | None,
    shape: Sequence[int] | torch.Size,
    dtype: torch.dtype = torch.float32,
    *,
    bits: int = 8,
) -> Tensor:
    """Inverse of ``quantize_blockwise``: a ``shape`` tensor of ``dtype``."""
    bs = _check(bits, block_size)
    n = math.prod(shape)
    want, n_blocks = (-(-n // 2) if bits == 4 else n), -(-n // bs)
    if codes.dtype != torch.uint8 or codes.numel() != want or absmax.numel() != n_blocks:
        raise ValueError(
            f"codes ({codes.dtype}, {codes.numel()}) / absmax ({absmax.numel()}) do not match shape"
            f" {tuple(shape)} at bits={bits}, block_size={bs}: want uint8 {want} / {n_blocks}"
        )
    if code.device != codes.device:
        raise ValueError(f"code is on {code.device}, codes on {codes.device}")
    native_out = native.dequantize(codes, absmax, code, bs, n, dtype, bits)
    if native_out is not None:
        return native_out.view(tuple(shape))
    table = code.to(torch.float32)
    if bits == 4:  # one gather through a 256 x 2 table of (high nibble, low nibble) values
        byte = torch.arange(256, device=code.device)
        code16 = torch.nn.functional.pad(table, (0, 16 - code.numel()))
        table = torch.stack([code16[byte >> 4], code16[byte & 15]], dim=1)
    flat, scale = codes.reshape(-1), absmax.to(torch.float32)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    step = _chunk(codes.device, bs)
    for start in range(0, n, step):
        m = min(step, n - start)
        if bits == 4:
            idx = flat[start // 2 : start // 2 + (m + 1) // 2].to(torch.int32)
            vals = table.index_select(0, idx).view(-1)[:m]
        else:
            vals = table.index_select(0, flat[start : start + m].to(torch.int32))
        b0, full = start // bs, m // bs
        # Multiply straight into the output dtype: same rounding as fp32 then .to().
        dst = out[start : start + full * bs].view(full, bs)
        torch.mul(vals[: full * bs].view(full, bs), scale[b0 : b0 + full, None], out=dst)
        if m > full * bs:
            torch.mul(vals[full * bs :], scale[b0 + full], out=out[start + full * bs : start + m])
    return out.view(tuple(shape))


def quantize_state(
    x: Tensor, kind: QuantKind, signed: bool, block_size: int | None = None
) -> dict[str, Tensor]:
    """Quantized optimizer state as tensors only: ``{"q": uint8 codes, "absmax": float32}``."""
    bits = _kind_bits(kind)
    q, absmax = quantize_blockwise(x, state_code(kind, signed, x.device), block_size, bits=bits)
    return {"q": q, "absmax": absmax}


def dequantize_state(
    d: dict[str, Tensor],
    shape: Sequence[int] | torch.Size,
    kind: QuantKind,
    signed: bool,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of ``quantize_state``."""
    bits = _kind_bits(kind)
    code = state_code(kind, signed, d["q"].device)
    return dequantize_blockwise(d["q"], d["absmax"], code, block_size, shape, dtype, bits=bits)
