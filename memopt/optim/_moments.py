"""Where Adam's moments live: plain tensors, or block-quantized 8-/4-bit codes.

``state_dtype`` (a group option) picks the storage:

- ``None``: the moments take the dtype of what they average (as the references do);
- ``"float32"``: fp32 moments (and fp32 compute) for bf16/fp16 parameters;
- ``"int8"`` / ``"int4"``: block-wise quantized moments (``lowbit``): the first moment
  with the signed dynamic-tree code, the second with an unsigned code, 256 (8-bit) or
  128 (4-bit) elements per absmax block. For a step they are dequantized into fp32
  working tensors of one parameter, updated, and quantized back, so the transient cost
  is one parameter's fp32 moments. Tensors with fewer than ``MIN_LOWBIT_NUMEL``
  elements stay fp32, as in bitsandbytes and torchao: their codes would cost more in
  absmax side arrays than they save.

State keys: ``exp_avg`` / ``exp_avg_sq`` (plain), or ``exp_avg_q``, ``exp_avg_absmax``,
``exp_avg_sq_q``, ``exp_avg_sq_absmax`` and ``moment_shape`` (quantized). All are
tensors or lists of ints, and quantization is deterministic, so resume is bit-exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memopt._utils import warn_once
from memopt.optim.lowbit import dequantize_state, quantize_state

LOWBIT = ("int8", "int4")
MIN_LOWBIT_NUMEL = 4096
_PLAIN = ("exp_avg", "exp_avg_sq")
FP16_MOMENTS = (
    "memopt: fp16 parameters with fp16 Adam moments (state_dtype=None): second moments below "
    "fp16's smallest value (6e-8) are stored as zero, and the next step divides by sqrt(v) "
    "+ eps alone, so steps grow by orders of magnitude (torch.optim.AdamW does the same). "
    'Pass state_dtype="float32" (or "int8"), or train with fp32 master weights (torch.amp)'
)
_QUANT = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax", "moment_shape")


def compute_fp32(group: dict[str, Any]) -> bool:
    """Whether this group computes in fp32 whatever the parameter dtype."""
    return group.get("state_dtype") in ("float32", *LOWBIT)


def build_dtype(dtype: torch.dtype, group: dict[str, Any]) -> torch.dtype:
    """The dtype of the plain moments this group builds for a tensor of ``dtype`` (fp32 when
    the group computes in fp32, else the tensor's own); a load casts saved moments to it."""
    return torch.float32 if compute_fp32(group) else dtype


def lowbit_kind(group: dict[str, Any], numel: int) -> Any:
    kind = group.get("state_dtype")
    return kind if kind in LOWBIT and numel >= MIN_LOWBIT_NUMEL else None


def present(state: dict[str, Any]) -> bool:
    return "exp_avg" in state or "exp_avg_q" in state


def drop(state: dict[str, Any]) -> None:
    """Forget the moments (they restart from zero on the next load)."""
    for k in (*_PLAIN, *_QUANT):
        state.pop(k, None)


def mismatch(state: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    """Why the stored moments cannot be those of a tensor of ``shape``, or None."""
    for key in _PLAIN:
        got = state.get(key)
        if isinstance(got, Tensor) and tuple(got.shape) != tuple(shape):
            return f"{key} has shape {tuple(got.shape)}, expected {tuple(shape)}"
    saved = state.get("moment_shape")
    if saved is not None and tuple(int(x) for x in saved) != tuple(shape):
        return f"its quantized moments are of shape {tuple(saved)}, expected {tuple(shape)}"
    return None


def load(state: dict[str, Any], like: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The moments to update in place: the stored tensors, or fp32 working copies.

    Stored moments of another shape (a state dict edited by hand) are an error here, before
    any kernel reads them; ``load_state_dict`` checks the same earlier."""
    why = mismatch(state, tuple(like.shape))
    if why is not None:
        raise ValueError(f"optimizer state does not fit its parameter: {why}")
    kind = lowbit_kind(group, like.numel())
    if kind is None:
        if "exp_avg" not in state:
            dtype = build_dtype(like.dtype, group)
            if dtype == torch.float16:
                warn_once(FP16_MOMENTS)
            state["exp_avg"] = torch.zeros(like.shape, dtype=dtype, device=like.device)
            state["exp_avg_sq"] = torch.zeros(like.shape, dtype=dtype, device=like.device)
        return state["exp_avg"], state["exp_avg_sq"]
    if "exp_avg_q" not in state:
        zeros = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return zeros, zeros.clone()
    shape = state["moment_shape"]
    m = dequantize_state(
        {"q": state["exp_avg_q"], "absmax": state["exp_avg_absmax"]}, shape, kind, signed=True
    )
    v = dequantize_state(
        {"q": state["exp_avg_sq_q"], "absmax": state["exp_avg_sq_absmax"]},
        shape,
        kind,
        signed=False,
    )
    return m, v


def store(state: dict[str, Any], m: Tensor, v: Tensor, group: dict[str, Any]) -> None:
    """Write working copies back (plain moments were updated in place: nothing to do)."""
    kind = lowbit_kind(group, m.numel())
    if kind is None:
        state["exp_avg"], state["exp_avg_sq"] = m, v  # rotation may have made new tensors
        return
    qm = quantize_state(m, kind, signed=True)
    qv = quantize_state(v.clamp_(min=0.0), kind, signed=False)
    state["exp_avg_q"], state["exp_avg_absmax"] = qm["q"], qm["absmax"]
    state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = qv["q"], qv["absmax"]
    state["moment_shape"] = list(m.shape)


def adopt_plain(state: dict[str, Any], group: dict[str, Any]) -> None:
    """Quantize plain moments that a load brought into a group storing them quantized (a
    torch.optim.AdamW state dict into ``state_dtype="int8"``): ``load`` reads only the codes,
    so the step would restart the moments from zero, and the plain ones stayed alive."""
    m, v = state.get("exp_avg"), state.get("exp_avg_sq")
    if not (isinstance(m, Tensor) and isinstance(v, Tensor)):
        return
    if lowbit_kind(group, m.numel()) is None:
        return
    del state["exp_avg"], state["exp_avg_sq"]
    store(state, m.float(), v.to(torch.float32, copy=True), group)  # (store clamps v)
