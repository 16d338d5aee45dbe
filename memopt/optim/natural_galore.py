"""Natural GaLore: GaLore with a natural-gradient step in the subspace (arXiv 2410.16029).

Each projected gradient R (the same projection as GaLore) is pushed into a ring buffer
of the last ``natural_history`` = s projected gradients H (s x k, k = R.numel()). The
update direction comes from Adam applied to the natural gradient

    R_nat = (damping I + H^T H)^-1 R
          = (R - H^T (damping I_s + H H^T)^-1 H R) / damping      # Woodbury: s x s solve

so the inverse empirical Fisher is applied without forming a k x k matrix.

Extra memory per matrix: s * k floats for the history (k = max(m, n) * r for a one-sided
projection, r * r for ``proj_type="full"``) and s^2 for its Gram matrix H H^T, kept
between steps so that a step computes only the newest row's inner products (one pass over
the history for them, one for H^T times the solve's result). Both are kept in at least
fp32, also for bf16 parameters: the step subtracts from R most of itself and divides by the
damping, which in bf16 leaves mostly rounding noise. With s = 4 and a
one-sided projection that is twice GaLore's moments; ``memopt.optim.state_bytes``
counts it. The reference keeps the history across subspace refreshes, mixing
gradients from two bases; here a refresh clears it, and by default the Adam moments
restart with it (``moments="reset"``): the natural gradient's scale depends on how full
the history is, so moments accumulated over a full history in the old basis mislead the
first steps in the new one (measured on a noisy least-squares problem at rank 8 of 16:
final loss 0.52 with reset against 4.4 with keep; GaLore with keep 0.97). With
``moments="rotate"`` the history is kept and used as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from memopt.optim import _functional as F
from memopt.optim.galore import GALORE_DEFAULTS, GaLoreAdamW, write_update


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLore AdamW on the Woodbury natural gradient of the projected gradient."""

    low_rank_defaults = {
        **GALORE_DEFAULTS,
        "natural_history": 4,
        "damping": 1e-3,
        "moments": "reset",
    }
    fused_steady_step = False  # its update is not GaLore's (the Woodbury step in between)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, **kwargs)

    def low_rank_step(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        proj, _, low, refreshed = self.projected_gradient(p, group, state, label)
        s = group["natural_history"]
        if "nat_hist" not in state:
            state["nat_hist"] = low.new_zeros((s, low.numel()), dtype=F.woodbury_dtype(low.dtype))
            state["nat_count"] = 0
        elif refreshed and group["moments"] != "rotate":
            state["nat_hist"].zero_()
            state.pop("nat_gram", None)  # rebuilt below from the cleared history
            state["nat_count"] = 0
        hist = state["nat_hist"]
        if "nat_gram" not in state:  # new, cleared, or a snapshot from before it was kept
            state["nat_gram"] = hist @ hist.T
        row = state["nat_count"] % s
        hist[row].copy_(low.reshape(-1))
        state["nat_count"] += 1
        filled = hist[: min(state["nat_count"], s)]
        natural = F.woodbury_newest_(low, filled, state["nat_gram"], row, group["damping"])
        direction, step_size = self.low_rank_adam(natural, group, state)
        write_update(p, proj, state, direction, step_size * group["scale"], group)
