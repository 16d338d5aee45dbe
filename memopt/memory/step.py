"""The optimizer step's working memory beyond parameters, gradients and state, per the path
each kind of state takes in ``memopt.optim`` (measured with torch's allocator events on CPU,
torch 2.13; ``tests/memory/test_step.py`` checks them against real steps):

- plain moments in the parameters' dtype: torch's fused AdamW updates in place (nothing);
- fp32 moments for non-fp32 weights (``state_dtype="float32"``, or the fp32 moments of
  tensors under 4096 elements with 8-/4-bit state): the fused call gets fp32 copies of the
  weights and gradients of its whole bucket at once (8 bytes per element);
- 8-bit moments: the fused kernel (native C++ on CPU, Triton on CUDA) steps the codes in
  place (nothing);
- 4-bit moments: one parameter at a time, dequantized into fp32 working moments (8 bytes per
  element), plus fp32 copies of non-fp32 weights and gradients (8), then re-quantized: new
  codes beside the old, and quantization temporaries of one chunk of whole blocks
  (``QUANT_CHUNK_BYTES`` per element of a 2^18-element chunk on CPU, 2^24 elsewhere);
- a projected matrix (GaLore, APOLLO, FRUGAL): its projected gradient and Adam direction
  (fp32-sized), the update goes back through a fused ``addmm_``; FRUGAL adds its full-size
  residual (the gradient's dtype), and a block-mode FRUGAL the sign of an inactive tensor's
  gradient; 8-/4-bit projected moments are dequantized as above.

These happen at different times of the step, so the figure is their largest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from memopt.memory.model import ParamInfo
from memopt.memory.optstate import MIN_LOWBIT_NUMEL, matrix, moment_bytes, projection

CPU_QUANT_CHUNK = 1 << 18  # memopt.optim.lowbit.quant._CPU_CHUNK
DEVICE_QUANT_CHUNK = 1 << 24  # quant._DEVICE_CHUNK
QUANT_CHUNK_BYTES = 14.03125  # bytes of quantization temporaries per element of a chunk
#: The 8-/4-bit code and search tables, built once per device and process and kept as module
#: constants (memopt.optim.lowbit.quant, memopt.optim.kernels.lowbit_adam) on a CPU run
#: (8-bit projected moments, dequantized natively, add 2 KiB of reference codes).
LOWBIT_TABLE_BYTES = {"int8": 86_056, "int4": 655_488}


def _lowbit(state_dtype: str | None, numel: int) -> bool:
    return state_dtype in ("int8", "int4") and numel >= MIN_LOWBIT_NUMEL


def _requantize(numel: int, state_dtype: str | None, device_kind: str, wide: bool) -> int:
    """The eager dequantize / step / quantize path of one tensor's moments."""
    work = 8 * numel + (8 * numel if wide else 0)  # fp32 moments (+ weight, gradient)
    chunk = CPU_QUANT_CHUNK if device_kind == "cpu" else DEVICE_QUANT_CHUNK
    temps = moment_bytes(numel, torch.float32, state_dtype)  # new codes beside the old
    if not (state_dtype == "int8" and device_kind == "cpu"):  # native int8 (de)quantizes
        temps += int(QUANT_CHUNK_BYTES * min(numel, chunk))
    return max(work, 8 * numel + temps)


def step_temporaries(
    optimizer: str,
    kw: Mapping[str, Any],
    infos: Sequence[ParamInfo],
    device_kind: str = "cpu",
    owned: float = 1.0,
) -> int:
    """Peak working bytes of one optimizer step (see the module docstring). ``kw``: the
    resolved ``optimizer_kwargs``; ``infos`` in the dtype the optimizer steps (the masters'
    when kept); ``owned``: the fraction of elements this rank steps (its fused bucket)."""
    sd = kw.get("state_dtype")
    block = optimizer == "frugal" and kw.get("proj") == "block"
    fused = eager = low_rank = 0
    for p in infos:
        wide = p.dtype != torch.float32
        projected = optimizer != "adamw" and p.low_rank and len(p.shape) >= 2 and not block
        if projected:
            low = projection(matrix(p.shape), kw).low_numel
            temp = 8 * low  # projected gradient and Adam direction
            if _lowbit(sd, low):
                temp += _requantize(low, sd, device_kind, False)
            if optimizer == "frugal":
                temp += p.nbytes  # the full-size residual G - P^T P G
            low_rank = max(low_rank, temp)
        elif _lowbit(sd, p.numel):
            if sd == "int4":  # int8 runs in place in the fused kernel
                eager = max(eager, _requantize(p.numel, sd, device_kind, wide))
        elif wide and sd is not None:  # fp32 moments of non-fp32 weights: copies in the bucket
            fused += 8 * p.numel
        if block and p.low_rank:
            low_rank = max(low_rank, p.nbytes)  # sign(g) of an inactive tensor
    return max(int(fused * owned), eager, low_rank)


def table_bytes(kw: Mapping[str, Any]) -> int:
    """The 8-/4-bit tables (``LOWBIT_TABLE_BYTES``) the state kind builds, else 0."""
    return LOWBIT_TABLE_BYTES.get(kw.get("state_dtype") or "", 0)
