"""APOLLO's step for many parameters at once: the small per-parameter work batched.

Per parameter, APOLLO's math is one projection, one Adam pass over the projected gradient,
a channel-norm pass over G and one scaled write of W. Around those sit a dozen operations on
tiny tensors (channel factors, the norm-growth limiter) that cost a kernel launch each; on a
GPU those launches, not memory traffic, set the step time of a whole model. Here they run
once per group over lists (``torch._foreach_*``) and stacked scalars:

    per parameter:  R = project(G); N, |N|_c^2, |R|_c^2 = adam(R)    (one fused kernel)
                    c = ||G||_c  (channel scaling + limiter only)
    per group:      s = sqrt(|N|_c^2) / (sqrt(|R|_c^2) + 1e-8)       (foreach)
                    u = ||c * s|| * front ;  lam = max(u / u_prev, gamma) / gamma
                    alpha = -lr_t (1 - lr wd) sqrt(scale) / lam      (stacked, on the device)
    per parameter:  W <- (1 - lr wd) W + alpha G s                   (one fused kernel)

Optimizer-in-backward (``step_one``) runs the same code on a group of one parameter;
nothing syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from memopt.optim import _functional as F
from memopt.optim import kernels
from memopt.optim.projection import writable_matrix

if TYPE_CHECKING:
    from memopt.optim._base import ParamMeta
    from memopt.optim.apollo import ApolloAdamW


@dataclass
class _Item:
    p: Tensor
    g: Tensor
    state: dict[str, Any]
    dim: int  # the channel dim of G: 1 = a factor per row, 0 = a factor per column
    step_size: float
    num: Tensor
    den: Tensor


def apollo_many(opt: ApolloAdamW, params: list[Tensor], group: dict[str, Any]) -> None:
    """One APOLLO step for ``params`` (low-rank, with gradients) of ``group``."""
    meta = opt._meta()
    items = [_project_and_adam(opt, p, group, meta[id(p)][1]) for p in params]
    by_kind: dict[tuple[str, bool], list[_Item]] = {}
    for it in items:  # stacking needs one device; the limiter's first step is special
        by_kind.setdefault((str(it.g.device), "nl_prev" in it.state), []).append(it)
    for chunk in by_kind.values():
        _finish(chunk, group)


def _project_and_adam(
    opt: ApolloAdamW, p: Tensor, group: dict[str, Any], meta: ParamMeta
) -> _Item:
    state = opt._init_state(p, group, meta)
    _, g, low, _ = opt.projected_gradient(p, group, state, meta.label)
    dim = 1 if state["proj_right"] else 0
    _, step_size, num, den = opt.adam_on(low, group, state, eps_mode="galore", norms_dim=dim)
    assert num is not None and den is not None
    return _Item(p, g, state, dim, step_size, num, den)


def _factors(items: list[_Item], tensor_wise: bool) -> list[Tensor]:
    """s per parameter: a 0-d tensor, or a column (m, 1) / row (1, n) of channel factors."""
    nums, dens = [it.num for it in items], [it.den for it in items]
    if tensor_wise:  # the channel sums are >= 0, so their 1-norm is their sum
        num = torch.stack(torch._foreach_norm(nums, 1))
        den = torch.stack(torch._foreach_norm(dens, 1))
        return list((num.sqrt() / (den.sqrt() + 1e-8)).unbind())
    top = torch._foreach_sqrt(nums)
    bottom = torch._foreach_sqrt(dens)
    torch._foreach_add_(bottom, 1e-8)
    out = torch._foreach_div(top, bottom)
    pairs = zip(out, items, strict=True)
    return [f.unsqueeze(1) if it.dim == 1 else f.unsqueeze(0) for f, it in pairs]


def _update_norms(items: list[_Item], factors: list[Tensor], tensor_wise: bool) -> Tensor:
    """||G * s|| per parameter (stacked), from channel norms of G: no G-sized temporary."""
    gs = [it.g for it in items]
    if tensor_wise:
        return torch.stack(torch._foreach_norm(gs)) * torch.stack(factors).abs()
    chans = [kernels.channel_norms(it.g, it.dim) for it in items]
    flat = [f.reshape(-1) for f in factors]
    return torch.stack(torch._foreach_norm(torch._foreach_mul(chans, flat)))


def _finish(items: list[_Item], group: dict[str, Any]) -> None:
    tensor_wise = group["scale_type"] == "tensor"
    factors = _factors(items, tensor_wise)
    keep = 1.0 - group["lr"] * group["weight_decay"]
    root = math.sqrt(group["scale"])
    sizes = {it.step_size for it in items}
    if group["disable_nl"]:
        for it, f in zip(items, factors, strict=True):
            _write(it, f, -it.step_size * keep * root, keep)
        return
    front = root if group["scale_front"] else 1.0
    norms = _update_norms(items, factors, tensor_wise) * front
    first = "nl_prev" not in items[0].state
    if first:
        for it in items:
            it.state["nl_prev"] = torch.empty((), device=norms.device, dtype=norms.dtype)
        new_prev, scale = norms, torch.full_like(norms, root)
    else:
        prev = torch.stack([it.state["nl_prev"] for it in items])
        lam = F.norm_growth_limiter(norms, prev, group["nl_gamma"])
        # a zero update (an all-zero gradient: zero_grad(set_to_none=False) and a module this
        # step did not use) keeps the last norm: stored, it crippled the next ~1800 steps
        new_prev, scale = torch.where(norms > 0, norms / lam, prev), root / lam
    torch._foreach_copy_([it.state["nl_prev"] for it in items], list(new_prev.unbind()))
    if len(sizes) == 1:  # the usual case: one bias-corrected step size for the group
        alphas = list((scale * (-sizes.pop() * keep)).unbind())
    else:
        alphas = [s * (-it.step_size * keep) for s, it in zip(scale.unbind(), items, strict=True)]
    for it, f, a in zip(items, factors, alphas, strict=True):
        _write(it, f, a, keep)


def _write(it: _Item, factor: Tensor, alpha: float | Tensor, keep: float) -> None:
    with writable_matrix(it.p) as w:
        kernels.scaled_update_(w, it.g, factor, alpha, keep)
