"""int8 block quantization on the CPU through the native library (``quant``'s fast path).

For 8 bits, 256-element blocks, contiguous CPU tensors and one of the int8 state codes
(``state_code("int8", signed)``, by value), ``quantize_blockwise`` and ``dequantize_blockwise``
call the C++ block routines of ``memopt.offload.cpu_lowbit`` (the ones the native int8 AdamW
uses) when the library is loaded and ``MEMOPT_KERNELS`` is ``auto``;
``MEMOPT_KERNELS=torch`` (or ``triton``) keeps the torch code of ``quant``. The native
routines take the same steps in the same fp32 arithmetic (one division per element, the
count of midpoints below y), so codes, absmax and dequantized values are bit-identical to
the torch path's. Inputs of other dtypes are converted to fp32 first, as ``quant`` does.
Blocks with inf or NaN match too: absmax is NaN (a NaN in the block) or inf, and every non-
finite y gets code 255, which is what the key tables give for the non-finite keys. The one
possible difference is which NaN bit pattern a NaN absmax carries when a block holds NaNs
with different payloads (torch's amax keeps one of them, the native max the largest
pattern). Dequantized NaNs are written as torch's vectorized x86 conversions write them
(bf16 0xffff, fp16 sign | 0x7e00); a torch build that converts with its scalar code gives
bf16 0x7fc0.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from memopt.offload import cpu_lowbit

_Table = tuple[Tensor, Tensor, int]  # (padded midpoints, int32 cell counts, steps)
_BITS, _BLOCK = 8, 256  # what the native routines take
_OUT = (torch.float32, torch.bfloat16, torch.float16)
_CODES: dict[int, tuple[weakref.ref[Tensor], int, bool | None]] = {}
_REFERENCE_CODES: dict[bool, Tensor] = {}


def native_on() -> bool:
    """``MEMOPT_KERNELS=auto`` and the native library loaded (``kernels.native_cpu_on``)."""
    from memopt.optim.kernels import native_cpu_on  # lazy: kernels imports this package

    return native_cpu_on()


def _signedness(code: Tensor) -> bool | None:
    """True / False when ``code`` equals the signed / unsigned int8 state code (by value,
    cached per live tensor and version), else None."""
    if code.device.type != "cpu" or code.dtype != torch.float32 or code.shape != (256,):
        return None
    key = id(code)
    entry = _CODES.get(key)
    if entry is not None and entry[0]() is code and entry[1] == code._version:
        return entry[2]
    if not _REFERENCE_CODES:  # private copies: the shared state codes could be edited
        from memopt.optim.lowbit.quant import state_code  # lazy: quant imports this module

        _REFERENCE_CODES.update({s: state_code("int8", s).clone() for s in (True, False)})
    found = next((s for s, ref in _REFERENCE_CODES.items() if torch.equal(code, ref)), None)

    def forget(_ref: weakref.ref[Tensor]) -> None:
        _CODES.pop(key, None)

    _CODES[key] = (weakref.ref(code, forget), code._version, found)
    return found


def _table(signed: bool) -> _Table:
    """The code's search tables, as the AdamW kernel takes them."""
    from memopt.optim.kernels.lowbit_adam import native_search_tables  # lazy, as above

    return native_search_tables(signed)


def quantize(
    x: Tensor, code: Tensor, bs: int, bits: int
) -> tuple[Tensor, Tensor] | None:
    """The native 8-bit quantization where it applies, else None (the torch code runs)."""
    if bits != _BITS or bs != _BLOCK or x.device.type != "cpu":
        return None
    if not x.is_contiguous() or not native_on():
        return None
    signed = _signedness(code)
    if signed is None:
        return None
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(-(-n // bs), dtype=torch.float32)
    cpu_lowbit.q8_quantize(flat, codes, absmax, table=_table(signed))
    return codes, absmax


def dequantize(
    codes: Tensor, absmax: Tensor, code: Tensor, bs: int, n: int, dtype: torch.dtype, bits: int
) -> Tensor | None:
    """The native 8-bit dequantization where it applies, else None (the torch code runs)."""
    if bits != _BITS or bs != _BLOCK or dtype not in _OUT:
        return None
    if codes.device.type != "cpu" or absmax.device.type != "cpu" or code.device.type != "cpu":
        return None
    if absmax.dtype != torch.float32 or code.dtype != torch.float32 or code.shape != (256,):
        return None
    if not (codes.is_contiguous() and absmax.is_contiguous() and code.is_contiguous()):
        return None
    if not native_on():
        return None
    out = torch.empty(n, dtype=dtype)
    cpu_lowbit.q8_dequantize(codes.reshape(-1), absmax.reshape(-1), code, out)
    return out
