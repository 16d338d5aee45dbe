"""Pure linear algebra for projector refreshes: top-r singular subspaces of a matrix.

- ``thin_svd``: the full thin SVD (LAPACK gesdd), as galore-torch computes it; on a
  convergence failure (GaLore#58, ill-conditioned gradients) it retries in float64
  instead of handing back a NaN basis.
- ``randomized_svd``: Halko, Martinsson and Tropp's range finder. With a random start it
  costs 2 (q + 1) products of G with an m x (r + p) block plus one small SVD, against
  O(m n min(m, n)) for the full SVD. Given a warm start (the previous basis), the same
  routine is subspace iteration: the subspace moves little between refreshes, so one or
  two power steps recover it.

Every function returns fp32/fp64 factors U (m x r) and Vh (r x n) ordered by singular
value (a Rayleigh-Ritz step orders the randomized ones).
"""

from __future__ import annotations

import torch
from torch import Tensor


def thin_svd(g: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r left/right singular vectors from the full thin SVD."""
    try:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        u, vh = u.to(g.dtype), vh.to(g.dtype)
    return u[:, :r], vh[:r]


def _orth(y: Tensor) -> Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def randomized_svd(
    g: Tensor,
    r: int,
    *,
    seed: int,
    oversample: int = 8,
    power_iters: int = 2,
    init: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Approximate top-r singular vectors of ``g`` (m x n).

    ``init`` (n x k, k >= r) replaces the Gaussian test matrix: that makes this a
    warm-started subspace iteration.
    """
    m, n = g.shape
    if init is None:
        k = min(r + oversample, m, n)
        gen = torch.Generator(device=g.device).manual_seed(seed)
        omega = torch.randn(n, k, generator=gen, device=g.device, dtype=g.dtype)
    else:
        omega = init.to(g.dtype)
    q = _orth(g @ omega)  # m x k, range of G
    for _ in range(power_iters):
        q = _orth(g.T @ q)  # n x k
        q = _orth(g @ q)  # m x k
    b = q.T @ g  # k x n
    ub, _, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[:, :r], vh[:r]
