"""GaLore's steady step on the CPU with no bookkeeping between its three kernels.

Between two subspace refreshes a GaLore step is, per matrix: project (one GEMM), Adam on the
projected gradient (the native one-pass kernel), back-project with the scale and weight decay
into W (one GEMM). On a small model the general path's Python around them (route and state
lookups, the generic projector and moments layers, allocations) cost a fifth of the step with
bf16 GEMMs and an eighth in fp32. ``fused_step`` checks that a matrix is on one of two exact
paths and runs the kernels with the arguments the general path would pass, so the result is
bitwise the same:

- ``"native"`` (``matmul_dtype="bfloat16"`` on an AMX CPU): all three kernels in one native
  call (``memopt.offload.cpu_gemm.projected_adam_``);
- ``"torch"`` (fp32, no ``matmul_dtype``): torch's two GEMMs and the native Adam pass,
  called directly.

Anything else (a refresh due, a first step, int8 moments, another route, dtype or device,
``proj_type="full"``, ``MEMOPT_KERNELS=torch``) returns False and the caller runs the
general step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from memopt.offload import cpu_gemm, cpu_lowrank
from memopt.optim import _functional as F
from memopt.optim import kernels
from memopt.optim._moments import LOWBIT
from memopt.optim.projection import lowp
from memopt.optim.projection.dense import DenseProjector

if TYPE_CHECKING:
    from memopt.optim.galore import GaLoreAdamW

Route = Literal["native", "torch"]


def group_route(opt: GaLoreAdamW, group: dict[str, Any]) -> Route | None:
    """Which one-call path the group's matrices may take (checked once per group per step)."""
    if (
        group.get("state_dtype") in LOWBIT
        or group["proj_type"] == "full"
        or not kernels.native_cpu_on()
        or not isinstance(opt.projector(group), DenseProjector)
    ):
        return None
    mm = group.get("matmul_dtype")
    if mm == "bfloat16" and cpu_gemm.available():
        return "native"
    return "torch" if mm is None else None


def fused_step(opt: GaLoreAdamW, p: Tensor, group: dict[str, Any], route: Route) -> bool:
    """``p``'s GaLore step on ``route`` (from ``group_route``) if it is a steady step there;
    returns whether it ran."""
    g = p.grad
    state = opt.state.get(p)
    if g is None or not state or p.dim() != 2 or g.layout != torch.strided:
        return False
    basis = state.get("proj_P")
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    if basis is None or m is None or v is None or "proj_Q" in state:
        return False
    right = bool(state.get("proj_right", True))
    fit = (g.shape[0], basis.shape[0]) if right else (basis.shape[1], g.shape[1])
    if m.shape != fit or v.shape != fit:  # the general path says what does not fit
        return False
    if opt._refresh_due(state, group) or not _fits(p, g, basis, m, v, route):
        return False
    b1, b2 = group["betas"]
    t = opt.bias_step(state) + 1  # this step's, once the counter has advanced
    bc1, bc2 = F.bias_corrections(t, b1, b2, group.get("correct_bias", True))
    lr = group["lr"]
    # The same float expressions, in the same order, as adam_update and write_update.
    step_size = F.adam_step_size(lr, bc1, bc2, "galore") * group["scale"]
    keep = 1.0 - lr * group["weight_decay"]
    if route == "native":
        cpu_gemm.projected_adam_(
            g, basis, p, m, v,
            right=right, beta1=b1, beta2=b2, eps=group["eps"], c2=1.0,
            alpha=-step_size * keep, beta=keep,
        )  # fmt: skip
    else:
        low = torch.mm(g, basis.T) if right else torch.mm(basis.T, g)
        d, _, _ = cpu_lowrank.lowrank_adam(
            low, m, v, beta1=b1, beta2=b2, eps=group["eps"], c2=1.0, norms_dim=None
        )
        a, b = (d, basis) if right else (basis, d)
        p.addmm_(a, b, beta=keep, alpha=-step_size * keep)
    state["step"] += 1
    return True


def _fits(p: Tensor, g: Tensor, basis: Tensor, m: Tensor, v: Tensor, route: Route) -> bool:
    """The tensors are what ``route``'s kernels take (fp32 CPU, contiguous moments)."""
    if not g.numel() or not (m.is_contiguous() and v.is_contiguous()):
        return False
    if route == "native":
        if lowp.route(g, "bfloat16") != "native" or not cpu_gemm.usable(p, basis, m, v):
            return False
        return p.stride(1) == 1 or p.shape[1] <= 1
    f32 = torch.float32
    return all(t.device.type == "cpu" and t.dtype == f32 for t in (p, g, basis, m, v))
