"""GaLore's steady step in one native call per matrix, where that call applies.

Between two subspace refreshes a GaLore step is, per matrix: project (one GEMM), Adam on the
projected gradient (one pass), back-project with the scale and weight decay into W (one
GEMM). With ``matmul_dtype="bfloat16"`` on an AMX CPU each of those is a native kernel, and
on a small model the Python around them (route and state lookups, two allocations, three
ctypes calls per matrix) cost about a fifth of the step. ``fused_step`` checks that the
matrix is on exactly that path and runs the three kernels in one call
(``memopt.offload.cpu_gemm.projected_adam_``) with the arguments the step-by-step path
would pass, so the result is bitwise the same; anything else (a refresh due, a first
step, int8 moments, another route or dtype, ``proj_type="full"``, ``MEMOPT_KERNELS=torch``)
returns False and the caller runs the general step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from memopt.offload import cpu_gemm
from memopt.optim import kernels
from memopt.optim._moments import LOWBIT
from memopt.optim.projection import lowp
from memopt.optim.projection.dense import DenseProjector

if TYPE_CHECKING:
    from memopt.optim.galore import GaLoreAdamW


def group_fusable(opt: GaLoreAdamW, group: dict[str, Any]) -> bool:
    """The group-level conditions (checked once per group per step)."""
    return (
        group.get("matmul_dtype") == "bfloat16"
        and group.get("state_dtype") not in LOWBIT
        and group["proj_type"] != "full"
        and kernels.native_cpu_on()
        and cpu_gemm.available()
        and isinstance(opt.projector(group), DenseProjector)
    )


def fused_step(opt: GaLoreAdamW, p: Tensor, group: dict[str, Any]) -> bool:
    """``p``'s GaLore step in one native call if it is a steady native-route step (the
    group passed ``group_fusable``); returns whether it ran."""
    g = p.grad
    state = opt.state.get(p)
    if g is None or not state or p.dim() != 2 or g.layout != torch.strided:
        return False
    basis = state.get("proj_P")
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    if basis is None or m is None or v is None or "proj_Q" in state:
        return False
    if opt._refresh_due(state, group) or lowp.route(g, "bfloat16") != "native":
        return False
    if not cpu_gemm.usable(p, basis, m, v) or p.stride(1) != 1 and p.shape[1] > 1:
        return False
    if not (m.is_contiguous() and v.is_contiguous()) or not g.numel():
        return False
    step = state["step"] + 1
    b1, b2 = group["betas"]
    t = step - state.get("moments_since", 0)  # what opt.bias_step gives after the increment
    correct = group.get("correct_bias", True)
    bc1 = 1.0 - b1**t if correct else 1.0
    bc2 = 1.0 - b2**t if correct else 1.0
    lr = group["lr"]
    # The same float expressions, in the same order, as adam_update and write_update.
    step_size = lr * math.sqrt(bc2) / bc1 * group["scale"]
    keep = 1.0 - lr * group["weight_decay"]
    cpu_gemm.projected_adam_(
        g, basis, p, m, v,
        right=bool(state.get("proj_right", True)),
        beta1=b1, beta2=b2, eps=group["eps"], c2=1.0,
        alpha=-step_size * keep, beta=keep,
    )  # fmt: skip
    state["step"] = step
    return True
