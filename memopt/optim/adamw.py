"""Full-rank AdamW on memopt's bookkeeping (torch.optim.AdamW's update rule).

Why it exists next to ``torch.optim.AdamW``: it is a ``MemoptOptimizer``, so it has
``step_one`` for optimizer-in-backward, tensor-only state that keeps its dtypes on load,
and the same group validation as the low-rank optimizers. The arithmetic is torch's own
fused AdamW kernel (``torch._fused_adamw_``, CPU and CUDA), called once per
(device, dtype) bucket in ``step()`` and once per parameter in ``step_one``, so both paths
compute identical bits and the speed is torch's fused AdamW's.

State per parameter: ``exp_avg``, ``exp_avg_sq`` (the parameter's dtype, or fp32 with
``state_dtype="float32"``, which then runs the update in fp32 and writes back) and an
integer ``step``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from memopt.optim._base import MemoptOptimizer

ADAMW_TORCH_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "state_dtype": None,
}


class AdamW(MemoptOptimizer):
    """AdamW with torch's defaults and update (eps after bias correction, decay first)."""

    base_defaults = ADAMW_TORCH_DEFAULTS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_dtype: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        meta = self._meta()
        for group in self.param_groups:
            buckets: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    self._prepare(p, group, meta[id(p)][1].label)
                    key = (p.device, p.dtype, self.state[p]["exp_avg"].dtype)
                    buckets[key].append(p)
            for params in buckets.values():
                self._fused(params, group)
        return loss

    def step_param(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        self._prepare(p, group, label)
        self._fused([p], group)

    def _prepare(self, p: Tensor, group: dict[str, Any], label: str) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            dtype = torch.float32 if group["state_dtype"] == "float32" else p.dtype
            state.setdefault("step", 0)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)

    def _fused(self, params: list[Tensor], group: dict[str, Any]) -> None:
        states = [self.state[p] for p in params]
        for st in states:
            st["step"] += 1
        steps = [torch.tensor(float(st["step"])) for st in states]
        mixed = states[0]["exp_avg"].dtype != params[0].dtype
        weights = [p.float() for p in params] if mixed else list(params)
        grads = [p.grad.to(w.dtype) for p, w in zip(params, weights, strict=True)]  # type: ignore[union-attr]
        b1, b2 = group["betas"]
        torch._fused_adamw_(
            weights,
            grads,
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            [],
            steps,
            lr=group["lr"],
            beta1=b1,
            beta2=b2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )
        if mixed:
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
