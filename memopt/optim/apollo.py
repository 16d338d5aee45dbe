"""APOLLO and APOLLO-Mini (Zhu et al., 2024, arXiv 2412.05270).

APOLLO keeps Adam moments only for a random projection R = P G of the gradient and uses
them to estimate how Adam would rescale each channel; the update is the *raw, full-rank*
gradient scaled by those factors:

    R = project(G)                        # seeded Gaussian P, N(0, 1/r) entries
    m, v = Adam moments of R ;  N = m / (sqrt(v) + eps)
    s = ||N||_c / (||R||_c + 1e-8)        # per channel c (rows if right-projected, columns
                                          # if left), or one number (scale_type="tensor")
    U = G * s * sqrt(scale)
    U /= max(||U|| / ||U_prev||, gamma) / gamma    # Fira's norm-growth limiter, gamma=1.01
    W <- (1 - lr wd) (W - lr sqrt(1 - b2^t) / (1 - b1^t) U)

APOLLO-Mini is rank 1 with a tensor-wise factor and scale 128.

Unlike apollo-torch, the projection is not stored: it is regenerated from a seed that is
the same on every rank, and the update is computed without full-size temporaries:
||G * s|| comes from per-channel norms of G, the limiter stays on the device (no host
sync per parameter), and the scaled write with weight decay is one ``addcmul_``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from memopt.optim import _functional as F
from memopt.optim._apollo_many import apollo_many
from memopt.optim._base import MemoptOptimizer
from memopt.optim.galore import ADAMW_DEFAULTS
from memopt.optim.projection import PROJECTORS
from memopt.optim.projection.dense import DenseProjector

APOLLO_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "proj": "random",
    "proj_options": {},
    "scale_type": "channel",
    "scale_front": False,
    "disable_nl": False,
    "nl_gamma": 1.01,
    "moments": "keep",
    "stagger": False,
    "matmul_dtype": None,
}


class ApolloAdamW(MemoptOptimizer):
    """APOLLO; group keys as apollo-torch's ``APOLLOAdamW`` (``rank``, ``proj``,
    ``scale_type``, ``update_proj_gap``, ``scale``, ``proj_type``), plus ``scale_front``
    and ``disable_nl`` per group or for the whole optimizer."""

    base_defaults = ADAMW_DEFAULTS
    low_rank_defaults = APOLLO_DEFAULTS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        *,
        state_dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        self._front, self._no_nl = scale_front, disable_nl
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            state_dtype=state_dtype,
        )
        super().__init__(params, defaults, seed=seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("rank") is not None or param_group.get("density") is not None:
            param_group.setdefault("scale_front", getattr(self, "_front", False))
            param_group.setdefault("disable_nl", getattr(self, "_no_nl", False))
        super().add_param_group(param_group)

    def check_group(self, group: dict[str, Any]) -> None:
        if self.is_low_rank(group):
            if group["scale_type"] not in ("channel", "tensor"):
                raise ValueError(
                    f"{type(self).__name__}: scale_type must be 'channel' or 'tensor', got "
                    f"{group['scale_type']!r}"
                )
            if group["proj_type"] == "full":
                raise NotImplementedError(
                    "APOLLO scales channels of one side; proj_type='full' (two-sided) has no "
                    "channel to scale: use std, reverse_std, left or right"
                )
            if not isinstance(self.projector(group), DenseProjector):
                names = PROJECTORS.names()
                bases = [n for n in names if issubclass(PROJECTORS.get(n), DenseProjector)]
                raise NotImplementedError(
                    f"{type(self).__name__}: proj={group['proj']!r} selects entries instead of "
                    "projecting onto a basis, and APOLLO's channel scaling needs a basis; use "
                    f"one of {bases} ('random' is APOLLO's)"
                )

    def plain_adam_mode(self, p: Tensor, group: dict[str, Any]) -> F.EpsMode | None:
        return None if self.projects(p, group) else "galore"

    def low_rank_many(self, params: list[Tensor], group: dict[str, Any]) -> None:
        # step(): the whole group at once (see _apollo_many); _step checked the gradients
        apollo_many(self, params, group)

    def low_rank_step(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        # step_one() (optimizer-in-backward): the same arithmetic for a group of one
        apollo_many(self, [p], group)


class ApolloMini(ApolloAdamW):
    """APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (``scale`` and ``scale_type`` may
    be overridden per group; ``rank`` must be 1: another rank is ``ApolloAdamW``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_mini(param_group, "ApolloMini")
        if param_group.get("rank") is not None:
            param_group.setdefault("scale_type", "tensor")
            param_group.setdefault("scale", 128.0)
        super().add_param_group(param_group)

    def check_loaded_group(self, saved: dict[str, Any], group: dict[str, Any], index: int) -> None:
        super().check_loaded_group(saved, group, index)
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        _check_mini(merged, f"ApolloMini.load_state_dict (group {index}, nothing was loaded)")


def _check_mini(group: dict[str, Any], owner: str) -> None:
    """APOLLO-Mini's projected groups are rank 1: a density, or another rank, would run a
    different method (plain APOLLO, or tensor-wise APOLLO at that rank) under this name."""
    if group.get("density") is not None:
        raise ValueError(
            f"{owner}: a group with density= would run as plain APOLLO (channel scale, "
            "scale 1); APOLLO-Mini is rank=1 with a tensor-wise scale. Pass rank=1, or use "
            "ApolloAdamW for another rank"
        )
    rank = group.get("rank")
    if rank is not None and not isinstance(rank, bool) and rank != 1:
        raise ValueError(
            f"{owner}: rank={rank!r}, but APOLLO-Mini is rank=1 (the moments of a rank-1 "
            "projection, one tensor-wise factor). Pass rank=1, or, for tensor-wise scaling at "
            "another rank, use ApolloAdamW with that rank and scale_type='tensor' (its scale "
            "defaults to 1, APOLLO-Mini's to 128)"
        )


def mini_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Convenience: every >=2-D parameter at rank 1, others full-state."""
    ps = list(params)
    return [
        {"params": [p for p in ps if p.dim() >= 2], "rank": 1},
        {"params": [p for p in ps if p.dim() < 2]},
    ]


__all__ = ["ApolloAdamW", "ApolloMini", "mini_groups"]
