"""The CPU half of one offload-pipeline group: the native AdamW on the staging views.

``cpu_batch`` brings one hyperparameter batch's gradients to the host (any device, fp32 /
bf16 / fp16 kept, other dtypes upcast), runs ``cpu_adamw_step_`` on the fp32 master and moment
views, and puts the updated master into the model tensor: the kernel writes a contiguous
bf16/fp16 CPU parameter directly (``out_lowp``), anything else takes a ``copy_`` (which also
covers a parameter on an accelerator). With a ``HybridUpdate`` the three phases (gradient copy,
update, parameter copy) are timed for its scheduler.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from memopt.offload.cpu_adam import cpu_adamw_step_
from memopt.offload.hybrid_update import HybridUpdate

__all__ = ["cpu_batch", "direct_lowp"]

_LOWP = (torch.bfloat16, torch.float16)


def cpu_batch(
    hyper: Any,
    lowp: bool,
    triples: list[tuple[Tensor, Tensor, Tensor]],
    hybrid: HybridUpdate | None,
) -> None:
    """The native kernel on one batch's staging views (gradients brought to the host first;
    a low-precision CPU parameter written by the kernel, anything else copied after).
    With a hybrid scheduler, the gradient copy (``d2h``), the update (``cpu``) and the
    parameter copy (``h2d``) are timed for it."""
    device = triples[0][2].device
    t0 = time.perf_counter()
    triples = [(view, _cpu_grad(g), param) for view, g, param in triples]
    t1 = time.perf_counter()
    ps, ms, vs = [], [], []
    for view, g, _ in triples:
        n = g.numel()
        ps.append(view[:n])
        ms.append(view[n : 2 * n])
        vs.append(view[2 * n : 3 * n])
    cpu_adamw_step_(
        ps, [g for _, g, _ in triples], ms, vs, step=hyper.step, lr=hyper.lr,
        beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
        weight_decay=hyper.weight_decay, eps_mode=hyper.eps_mode,
        out_lowp=[p for _, _, p in triples] if lowp else None,
    )  # fmt: skip
    t2 = time.perf_counter()
    if not lowp:
        for (_, _, param), master in zip(triples, ps, strict=True):
            param.copy_(master)
    if hybrid is None:
        return
    n = sum(p.numel() for p in ps)
    if device.type == "cpu":
        hybrid.observe("cpu", n, time.perf_counter() - t1)
        return
    hybrid.observe("d2h", sum(g.numel() * g.element_size() for _, g, _ in triples), t1 - t0)
    hybrid.observe("cpu", n, t2 - t1)
    hybrid.observe("h2d", sum(p.numel() * p.element_size() for _, _, p in triples),
                   time.perf_counter() - t2)  # fmt: skip


def _cpu_grad(g: Tensor) -> Tensor:
    if g.device.type != "cpu":
        g = g.to("cpu")
    if g.dtype not in (torch.float32, *_LOWP):
        g = g.float()
    return g.contiguous()


def direct_lowp(param: Tensor) -> Tensor | None:
    """A contiguous bf16/fp16 CPU parameter slice (the kernel writes it directly)."""
    if param.device.type == "cpu" and param.dtype in _LOWP and param.is_contiguous():
        return param
    return None
