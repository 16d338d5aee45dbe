"""Update rules as pure functions over tensors (no optimizer bookkeeping here).

Legend: ``low`` is a projected gradient, ``direction`` the Adam-normalized update in the
same space, ``g`` a full 2-D gradient.

Two placements of Adam's epsilon exist in the wild and both are kept, because parity
with the references depends on it:

- ``eps_mode="galore"`` (galore-torch, apollo-torch, HF's legacy AdamW):
  d = m / (sqrt(v) + eps), step size lr * sqrt(1 - b2^t) / (1 - b1^t).
- ``eps_mode="torch"`` (torch.optim.AdamW, FRUGAL):
  d = m / (sqrt(v) / sqrt(1 - b2^t) + eps), step size lr / (1 - b1^t).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

EpsMode = Literal["galore", "torch"]
HALF_DTYPES = (torch.bfloat16, torch.float16)


def is_half(t: Tensor) -> bool:
    """bf16 / fp16: where a decay ``(1 - lr wd) W`` applied as its own multiply rounds back to
    W whenever ``lr wd`` is below half an ulp (2^-9 relative in bf16), so it must share one
    rounding with the update."""
    return t.dtype in HALF_DTYPES


@contextlib.contextmanager
def fp32_work(w: Tensor, fold: bool = True) -> Iterator[Tensor]:
    """``w`` to update in place in several steps (decay, then one or two updates), rounded
    once: for a bf16 / fp16 ``w`` (and ``fold``) an fp32 copy written back on exit, else ``w``
    itself (fp32 arithmetic unchanged). The transient cost is one fp32 copy of ``w``."""
    if not (fold and is_half(w)):
        yield w
        return
    work = w.float()
    yield work
    w.copy_(work)


def adam_moments_(
    exp_avg: Tensor, exp_avg_sq: Tensor, g: Tensor, beta1: float, beta2: float
) -> None:
    """m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2  (in place)."""
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def bias_corrections(
    step: int, beta1: float, beta2: float, correct_bias: bool = True
) -> tuple[float, float]:
    """(1 - b1^t, 1 - b2^t), or (1, 1) without bias correction."""
    if not correct_bias:
        return 1.0, 1.0
    return 1.0 - beta1**step, 1.0 - beta2**step


def adam_step_size(lr: float, bc1: float, bc2: float, eps_mode: EpsMode) -> float:
    """What the direction is scaled by (see module docstring for the two eps placements)."""
    return lr / bc1 if eps_mode == "torch" else lr * math.sqrt(bc2) / bc1


def adam_direction(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    lr: float,
    eps_mode: EpsMode = "galore",
    correct_bias: bool = True,
) -> tuple[Tensor, float]:
    """The normalized direction and the step size to scale it by (see module docstring)."""
    bc1, bc2 = bias_corrections(step, beta1, beta2, correct_bias)
    if eps_mode == "galore":
        denom = exp_avg_sq.sqrt().add_(eps)
    else:
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(eps)
    return exp_avg / denom, adam_step_size(lr, bc1, bc2, eps_mode)


def norm_growth_limiter(norm: Tensor, prev: Tensor, gamma: float) -> Tensor:
    """Fira's limiter: the divisor that caps ||u_t|| / ||u_{t-1}|| at ``gamma``.

    Returned as a tensor (no host sync), >= 1. A zero ``prev`` (no update yet with a nonzero
    norm: the first steps' gradients were all zeros) sets no limit, as on the first step.
    Fira and apollo-torch divide by ``prev + 1e-8`` there: the next update shrinks ~1e8-fold
    and, growing ``gamma`` per step, takes ~1800 steps to recover.
    """
    ratio = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma
    return torch.where(prev > 0, ratio, torch.ones_like(ratio))


def woodbury_natural_gradient(low: Tensor, history: Tensor, damping: float) -> Tensor:
    """(damping I + H H^T)^-1 low, by the Woodbury identity over the s stored gradients.

    ``history`` is s x k (rows are flattened past projected gradients), ``low`` has k
    elements. Cost: one s x s solve, O(s k) memory traffic; never a k x k matrix.
    """
    flat = low.reshape(-1)
    hg = history @ flat  # s
    gram = history @ history.T  # s x s
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(damping * eye + gram, hg)  # s
    nat = (flat - history.T @ coef) / damping
    return nat.reshape(low.shape)


def woodbury_newest_(
    low: Tensor, history: Tensor, gram: Tensor, newest: int, damping: float
) -> Tensor:
    """``woodbury_natural_gradient`` for ``low`` stored as row ``newest`` of ``history``, with
    the Gram matrix ``H H^T`` kept between calls (``gram``, s x s, updated in place; both in
    ``woodbury_dtype``). Returns the natural gradient in ``low``'s dtype.

    Only the newest row's inner products change when it is written, and they are also the
    ``H low`` the solve needs: one pass over the history for them and one for ``H^T coef``,
    instead of recomputing the whole Gram matrix every step.
    """
    flat = low.reshape(-1).to(history.dtype)
    n = history.shape[0]
    dots = history @ flat  # n: <row_j, low>, and H low
    gram[newest, :n] = dots
    gram[:n, newest] = dots
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(damping * eye + gram[:n, :n], dots)
    nat = torch.addmv(flat, history.T, coef, beta=1.0 / damping, alpha=-1.0 / damping)
    return nat.reshape(low.shape).to(low.dtype)


def woodbury_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the natural gradient is computed (its history, Gram matrix and solve): at least
    fp32. The Woodbury step subtracts from R most of itself and divides by the damping, so
    bf16 arithmetic leaves mostly rounding noise (and LAPACK / cuSOLVER have no bf16 solve)."""
    return torch.promote_types(dtype, torch.float32)


def rotate_moments_(
    exp_avg: Tensor, exp_avg_sq: Tensor, change: list[Tensor], right: bool
) -> tuple[Tensor, Tensor]:
    """Express moments in a new basis: m' = m C (or C m, or A m B); v' uses C * C.

    The second moment is rotated with the squared entries of the change of basis, the
    exact map for a diagonal covariance; it keeps v non-negative.
    """
    if len(change) == 2:
        a, b = change
        return a @ exp_avg @ b, (a * a) @ exp_avg_sq @ (b * b)
    (c,) = change
    if right:
        return exp_avg @ c, exp_avg_sq @ (c * c)
    return c @ exp_avg, (c * c) @ exp_avg_sq
