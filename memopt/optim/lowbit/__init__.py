"""Low-bit optimizer state: block-wise 8-/4-bit quantization (see ``quant``)."""

from __future__ import annotations

from memopt.optim.lowbit.quant import (
    DEFAULT_BLOCK_SIZE,
    KIND_BITS,
    QuantKind,
    dequantize_blockwise,
    dequantize_state,
    dynamic_map,
    linear_map,
    nearest_index,
    pack_nibbles,
    quantize_blockwise,
    quantize_state,
    state_code,
    unpack_nibbles,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "KIND_BITS",
    "QuantKind",
    "dequantize_blockwise",
    "dequantize_state",
    "dynamic_map",
    "linear_map",
    "nearest_index",
    "pack_nibbles",
    "quantize_blockwise",
    "quantize_state",
    "state_code",
    "unpack_nibbles",
]
