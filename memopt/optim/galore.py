"""GaLore: Adam in a low-rank gradient subspace (Zhao et al., 2024, arXiv 2403.03507).

For an m x n weight with gradient G and a basis P refreshed every ``update_proj_gap``
steps (top-r singular vectors of G by default):

    R = project(G)                  # max(m, n) x r
    m, v = Adam moments of R        # kept across refreshes by default, as the reference
    N = m / (sqrt(v) + eps)         # eps before bias correction, as galore-torch
    W <- (1 - lr wd) (W - lr sqrt(1 - b2^t) / (1 - b1^t) * scale * project_back(N))

By default this reproduces galore-torch 1.0's ``GaLoreAdamW`` to float tolerance, with
the same group keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``). Beyond it:
``proj`` (``svd`` | ``rsvd`` | ``subspace`` | ``orthogonal`` | ``random`` ...),
``moments`` (keep | reset | rotate), ``stagger`` (spread refreshes over the gap),
``state_dtype="float32"`` (fp32 moments and basis for bf16 parameters), and correct
handling of what the reference gets wrong: ``reverse_std`` on square projections, 1-D
parameters in a low-rank group, and tensors with more than 2 dims (viewed as dim 0 x the
rest). The back-projection, scale, weight decay and write into W are one ``addmm_``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from torch import Tensor

from memopt.optim import _functional as F
from memopt.optim._base import MemoptOptimizer
from memopt.optim._galore_fused import fused_step, group_route
from memopt.optim.projection import writable_matrix

ADAMW_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "correct_bias": True,
    "state_dtype": None,
}

GALORE_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "proj": "svd",
    "proj_options": {},
    "moments": "keep",
    "stagger": False,
    "matmul_dtype": None,
}


class GaLoreAdamW(MemoptOptimizer):
    """GaLore AdamW; a drop-in for ``galore_torch.GaLoreAdamW``.

    Groups with a ``rank`` key are projected; other groups get plain AdamW (same eps
    placement as the reference). Use :func:`memopt.optim.param_groups` to build groups.
    """

    base_defaults = ADAMW_DEFAULTS
    low_rank_defaults = GALORE_DEFAULTS
    #: Whether steady steps may take the one-call native path (``_galore_fused``); a
    #: subclass that changes the update rule (Natural GaLore) turns it off.
    fused_steady_step: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        state_dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            state_dtype=state_dtype,
        )
        super().__init__(params, defaults, seed=seed)

    def plain_adam_mode(self, p: Tensor, group: dict[str, Any]) -> F.EpsMode | None:
        return None if self.projects(p, group) else "galore"

    def low_rank_many(self, params: list[Tensor], group: dict[str, Any]) -> None:
        route = group_route(self, group) if self.fused_steady_step else None
        if route is None:
            super().low_rank_many(params, group)
            return
        for p in params:
            if not fused_step(self, p, group, route):
                self.step_one(p)

    def low_rank_step(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        route = group_route(self, group) if self.fused_steady_step else None
        if route is not None and fused_step(self, p, group, route):
            return  # optimizer-in-backward's steady steps
        proj, _, low, _ = self.projected_gradient(p, group, state, label)
        direction, step_size = self.low_rank_adam(low, group, state)
        write_update(p, proj, state, direction, step_size * group["scale"], group)

    def low_rank_adam(
        self, low: Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> tuple[Tensor, float]:
        """Adam moments on the projected gradient; returns (direction, step size)."""
        direction, step_size, _, _ = self.adam_on(low, group, state, eps_mode="galore")
        return direction, step_size


def write_update(
    p: Tensor,
    proj: Any,
    state: dict[str, Any],
    low: Tensor,
    step_size: float,
    group: dict[str, Any],
) -> None:
    """W <- (1 - lr wd) (W - step_size * project_back(low)), fused where the layout allows."""
    keep = 1.0 - group["lr"] * group["weight_decay"]
    with writable_matrix(p) as w:  # (a copy written back when no 2-D view exists)
        proj.apply_update(state, low, w, alpha=-step_size * keep, beta=keep)
