"""``cast_model(model, dtype)``: the ``model.dtype`` cast of ``memopt.setup``.

Floating parameters (and their gradients) and floating *persistent* buffers take ``dtype``.
Non-persistent buffers are never rounded: they keep their dtype, or widen to a wider ``dtype``
(bf16 -> fp32). Those are constants a module derives at construction, such as a rotary
embedding's ``inv_freq``: in bf16 its angles are off by about 0.4 rad at position 2048.
DeepSpeed's bf16/fp16 engine and Hugging Face's ``from_pretrained(dtype=...)`` keep
``inv_freq`` fp32 too, so a model trained here is evaluated with the frequencies it was
trained with. Persistent buffers are model state (BatchNorm's running statistics) and follow
the parameters, as under ``model.to(dtype)``: a bf16 layer with fp32 statistics fails in
``batch_norm`` on the CPU (DeepSpeed casts no buffer at all). ``model.to(dtype)`` would round
every floating buffer.
"""

from __future__ import annotations

import torch
from torch import nn


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating parameters and persistent floating buffers to ``dtype``
    in place (see the module docstring); return ``model``."""
    if not dtype.is_floating_point:
        raise ValueError(f"cast_model: dtype must be a floating dtype, got {dtype}")
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                if p.grad is not None:
                    p.grad = p.grad.to(dtype)
        wide = torch.finfo(dtype).bits
        for module in model.modules():
            derived = module._non_persistent_buffers_set
            for name, buf in module._buffers.items():
                if buf is None or not buf.is_floating_point() or buf.dtype == dtype:
                    continue
                if name not in derived or torch.finfo(buf.dtype).bits < wide:  # never rounded
                    module._buffers[name] = buf.to(dtype)
    return model
