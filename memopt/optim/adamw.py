"""Full-rank AdamW on memopt's bookkeeping (torch.optim.AdamW's update rule).

Why it exists next to ``torch.optim.AdamW``: it is a ``MemoptOptimizer``, so it has
``step_one`` for optimizer-in-backward, tensor-only state that keeps its dtypes on load,
and the same group validation as the low-rank optimizers. The arithmetic is torch's own
fused AdamW kernel (``torch._fused_adamw_``, CPU and CUDA; see ``_full_adam``), called
once per bucket in ``step()`` and once per parameter in ``step_one``, so both paths compute
identical bits and the speed is torch's fused AdamW's.

State per parameter: ``exp_avg``, ``exp_avg_sq`` (the parameter's dtype, or fp32 with
``state_dtype="float32"``, which then runs the update in fp32 and writes back) and an
integer ``step``.

The constructor takes torch.optim.AdamW's arguments too (``amsgrad``, ``maximize``,
``foreach``, ``capturable``, ``differentiable``, ``fused``): ``foreach`` and ``fused`` are
accepted and ignored (the kernel is torch's fused one already), the others only at torch's
defaults (a ``ValueError`` names the one that asks for more). Groups may carry the same
keys under the same rule, as a torch checkpoint's do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from memopt.optim import _functional as F
from memopt.optim._base import MemoptOptimizer
from memopt.optim._groups import check_torch_keys

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
        amsgrad: bool = False,
        *,
        state_dtype: str | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        # torch.optim.AdamW's own options, so that a drop-in swap keeps its arguments: the
        # implementation choices (foreach, fused) are ignored, memopt always runs torch's
        # fused kernel where it exists; the features (amsgrad, ...) only at their defaults.
        torch_options = dict(
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        check_torch_keys(torch_options, type(self).__name__)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype
        )
        super().__init__(params, defaults)

    def plain_adam_mode(self, p: Tensor, group: dict[str, Any]) -> F.EpsMode | None:
        return "torch"
