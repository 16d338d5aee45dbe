"""Pure linear algebra for projector refreshes: top-r singular subspaces of a matrix.

- ``thin_svd``: the full thin SVD (LAPACK gesdd), as galore-torch computes it; on a
  convergence failure (GaLore#58, ill-conditioned gradients) it retries in float64
  instead of handing back a NaN basis.
- ``randomized_svd``: Halko, Martinsson and Tropp's range finder. With a random start it
  costs 2 (q + 1) products of G with an m x (r + p) block plus one small SVD, against
  O(m n min(m, n)) for the full SVD. Given a warm start (the previous basis), the same
  routine is subspace iteration: the subspace moves little between refreshes, so one or
  two power steps recover it.

Every function returns factors U (m x r) and Vh (r x n) ordered by singular value (a
Rayleigh-Ritz step orders the randomized ones). All accept a batch of same-shape
matrices (b x m x n): the optimizer stacks parameters of one shape whose refresh falls on
the same step, so a refresh costs one batched LAPACK/cuSOLVER call per shape instead of a
Python loop per parameter.
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
    return u[..., :r], vh[..., :r, :]


def _orth(y: Tensor) -> Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def gaussian_test_matrix(n: int, k: int, seeds: list[int], like: Tensor) -> Tensor:
    """One n x k Gaussian block per seed (stacked if several), from per-seed generators."""
    blocks = []
    for seed in seeds:
        gen = torch.Generator(device=like.device).manual_seed(seed)
        blocks.append(torch.randn(n, k, generator=gen, device=like.device, dtype=like.dtype))
    return blocks[0] if like.dim() == 2 else torch.stack(blocks)


def randomized_svd(
    g: Tensor,
    r: int,
    *,
    seed: int | list[int],
    oversample: int = 8,
    power_iters: int = 2,
    init: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Approximate top-r singular vectors of ``g`` (m x n, or b x m x n with b seeds).

    ``init`` (n x k, k >= r) replaces the Gaussian test matrix: that makes this a
    warm-started subspace iteration.
    """
    m, n = g.shape[-2:]
    if init is None:
        k = min(r + oversample, m, n)
        seeds = seed if isinstance(seed, list) else [seed]
        omega = gaussian_test_matrix(n, k, seeds, g)
    else:
        omega = init.to(g.dtype)
    q = _orth(g @ omega)  # m x k, range of G
    for _ in range(power_iters):
        q = _orth(g.mT @ q)  # n x k
        q = _orth(g @ q)  # m x k
    b = q.mT @ g  # k x n
    ub, _, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[..., :r], vh[..., :r, :]
