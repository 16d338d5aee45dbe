"""Winner-take-all column-row sampling (WTA-CRS): the math, apart from any bookkeeping.

For a linear layer ``y = x W^T + b`` with ``x`` flattened to ``[N, in]`` and the output gradient
``g`` to ``[N, out]``, the weight gradient is a sum of N rank-one terms

    grad_W = g^T x = sum_i f_i,    f_i = g_i^T x_i   (||f_i||_F = ||g_i|| * ||x_i||).

Column-row sampling (CRS) keeps only ``k = ceil(ratio * N)`` rows of ``x`` from the forward:
draw ``s`` indices r_1..r_s i.i.d. from a distribution q over the rows and use
``(1/s) sum_j f_{r_j} / q_{r_j}``, unbiased for any q that is positive wherever f_i != 0.

Winner-take-all (Liu et al., NeurIPS'23, arXiv 2305.15265) spends part of the budget on the
rows of largest probability, taken *deterministically* with weight 1, and samples the rest of
the budget from the remaining rows:

    p_i   = importance of row i (known in the forward, sums to 1)
    C     = the c rows of largest p_i (c chosen below),  P_C = sum_{i in C} p_i
    q_i   = p_i / (1 - P_C) for i not in C (0 on C),    s = k - c draws r_j ~ q i.i.d.
    est   = sum_{i in C} f_i + (1/s) sum_{j=1..s} f_{r_j} / q_{r_j}

E[est] = sum_C f_i + sum_{i not in C} f_i = grad_W (C and q depend on p only, never on the
draws or on the current g), so the estimator is unbiased. Its variance (Frobenius) is

    Var(c) = (1/s) * ( sum_{i not in C} ||f_i||^2 / q_i - ||sum_{i not in C} f_i||^2 ).

With q_i proportional to ||f_i|| the first term is ((1 - P_C) * S)^2 where S = sum_i ||f_i||, so
up to the (unknown, non-negative) second term Var(c) <= (1 - P_C)^2 S^2 / (k - c). We pick
``c in [0, k)`` minimising ``(1 - P_c)^2 / (k - c)``; c = 0 is plain CRS (score 1/k), so the
chosen c never has a larger bound than CRS. (The authors' code minimises ``(1 - P_c)/(k - c)``
and falls back to c = 0 unless that beats 1/k: a more conservative rule; ours is the bound
above, derived here.) Everything stays on the device: no host synchronisation, and the sample
always has exactly k rows (fixed shapes: recompute-safe, CUDA-graph friendly).

Importance ``p``: the optimal CRS distribution is p_i ~ ||x_i|| * ||g_i||, but g is not known
in the forward. As in the paper's code, ``||g_i||`` is taken from the *previous* backward of the
same layer (same N), else dropped (p_i ~ ||x_i||). Unlike the paper (which adds 1e-8), the
proxy is floored at ``floor * mean(||g||)`` so that a row whose previous gradient was 0 keeps a
positive probability: unbiasedness never rests on the proxy being right, only variance does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["crs_weight_grad", "row_importance", "sample_budget", "wta_sample"]


def sample_budget(rows: int, ratio: float) -> int:
    """Rows kept out of ``rows`` at ``ratio``: ``ceil(ratio * rows)``, at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"sample ratio={ratio}; it must lie in (0, 1]")
    return max(1, min(rows, math.ceil(ratio * rows - 1e-9)))


@torch.no_grad()
def row_importance(
    x2d: torch.Tensor, grad_row_norm: torch.Tensor | None = None, floor: float = 0.05
) -> torch.Tensor:
    """Sampling probabilities ``p`` (float32, sums to 1) for the rows of ``x2d`` ``[N, in]``.

    ``p_i ~ ||x_i|| * (h_i + floor * mean(h))`` with ``h = grad_row_norm`` (the previous
    backward's ``||g_i||``) when given, else ``p_i ~ ||x_i||``; uniform when every row is 0.
    """
    score = torch.linalg.vector_norm(x2d.float(), dim=1)
    if grad_row_norm is not None:
        h = grad_row_norm.to(device=score.device, dtype=torch.float32)
        score = score * (h + floor * h.mean())
    total = score.sum()
    uniform = torch.full_like(score, 1.0 / score.numel())
    return torch.where(total > 0, score / total.clamp_min(torch.finfo(score.dtype).tiny), uniform)


def _wta_count(top_p: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic count c (0-dim device tensor) minimising (1 - P_c)^2 / (k - c)."""
    prefix = torch.cumsum(top_p, 0) - top_p  # P_c for c = 0..k-1
    c_range = torch.arange(k, device=top_p.device, dtype=top_p.dtype)
    score = (1.0 - prefix).clamp_min(0.0).square() / (k - c_range)
    return torch.argmin(score)  # first minimum: the smallest c reaching it


@torch.no_grad()
def wta_sample(
    p: torch.Tensor, k: int, generator: torch.Generator | None = None, *, wta: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``idx`` (int64 ``[k]``) and weights ``w`` (float32 ``[k]``) such that
    ``sum_j w_j f_{idx_j}`` is an unbiased estimate of ``sum_i f_i`` (see the module doc).

    ``wta=False`` is plain CRS (c = 0: all k rows drawn i.i.d. from p). Requires k < N.
    """
    n = p.numel()
    if not 0 < k < n:
        raise ValueError(f"wta_sample needs 0 < k < N, got k={k}, N={n}")
    top_p, top_i = torch.topk(p, k)  # sorted, largest first
    c = _wta_count(top_p, k) if wta else torch.zeros((), dtype=torch.long, device=p.device)
    j = torch.arange(k, device=p.device)
    in_c = torch.zeros(n, dtype=torch.bool, device=p.device)
    in_c[top_i] = j < c
    resid = p.masked_fill(in_c, 0.0)
    # If C took all the mass the rest rows have f_i = 0 (p_i = 0 only where x_i = 0): any
    # positive q over them keeps the estimate exact; use uniform.
    resid = torch.where(resid.sum() > 0, resid, (~in_c).to(p.dtype))
    q = resid / resid.sum()
    draws = torch.multinomial(q, k, replacement=True, generator=generator)
    s = (k - c).to(torch.float32)
    w_stoc = 1.0 / (q[draws] * s)
    idx = torch.where(j < c, top_i, draws)
    w = torch.where(j < c, torch.ones_like(w_stoc), w_stoc)
    return idx, w


def crs_weight_grad(
    g2d: torch.Tensor, x_sel: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """``sum_j w_j g_{idx_j}^T x_sel_j``: the sampled estimate of ``g^T x``, shape [out, in]."""
    g_sel = g2d.index_select(0, idx)
    scaled = (g_sel.float() * w.unsqueeze(1)).to(x_sel.dtype)
    return scaled.t() @ x_sel

