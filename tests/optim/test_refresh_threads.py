"""The refresh's small factorizations run on one CPU thread; the pool is restored after."""

from __future__ import annotations

import pytest
import torch

from memopt._utils.threads import single_threaded
from memopt.optim.projection import linalg


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_single_threaded_restores_even_on_error(two_threads) -> None:
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), single_threaded():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with single_threaded(enabled=False):
        assert torch.get_num_threads() == 2


def test_randomized_svd_factors_on_one_thread(two_threads, monkeypatch) -> None:
    seen: dict[str, list[int]] = {"svd": [], "cholesky": [], "gemm_outside": []}
    svd, chol = torch.linalg.svd, torch.linalg.cholesky

    def spy_svd(*a, **k):
        seen["svd"].append(torch.get_num_threads())
        return svd(*a, **k)

    def spy_chol(*a, **k):
        seen["cholesky"].append(torch.get_num_threads())
        return chol(*a, **k)

    monkeypatch.setattr(torch.linalg, "svd", spy_svd)
    monkeypatch.setattr(torch.linalg, "cholesky", spy_chol)
    g = torch.randn(3, 96, 64, generator=torch.Generator().manual_seed(0))
    u, vh = linalg.randomized_svd(g, 8, seed=[1, 2, 3])
    assert seen["svd"] == [1] and seen["cholesky"] and set(seen["cholesky"]) == {1}
    assert torch.get_num_threads() == 2
    # Same subspace as the exact SVD (the test matrix has a clear spectral gap).
    low = torch.randn(3, 96, 8) @ torch.randn(3, 8, 64) * 10 + 1e-3 * g
    u, vh = linalg.randomized_svd(low, 8, seed=[1, 2, 3])
    _, _, vh_exact = svd(low, full_matrices=False)
    overlap = torch.linalg.matrix_norm(vh @ vh_exact[:, :8].mT) ** 2 / 8
    assert torch.allclose(overlap, torch.ones(3), atol=1e-4)


def test_all_finite_fast_path_and_overflow() -> None:
    from memopt.optim._refresh import all_finite

    big = torch.full((4, 4), 3e38)  # finite entries whose sum overflows to inf
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(8, 8)
        t[3, 5] = bad
        assert not all_finite(t)
    pair = torch.tensor([float("inf"), float("-inf")])  # the sum is NaN, the check too
    assert not all_finite(pair)
    assert all_finite(torch.randn(5, 7, dtype=torch.bfloat16))


def test_wide_svd_matches_lapack_and_falls_back_when_rank_deficient() -> None:
    g = torch.Generator().manual_seed(4)
    # distinct singular values, so the factors are unique up to sign
    u0 = torch.linalg.qr(torch.randn(3, 12, 12, generator=g, dtype=torch.float64))[0]
    v0 = torch.linalg.qr(torch.randn(3, 50, 12, generator=g, dtype=torch.float64))[0]
    s0 = torch.linspace(10, 1, 12, dtype=torch.float64)
    b = (u0 * s0) @ v0.mT
    ub, vh = linalg._wide_svd(b.float())
    u_ref, _, vh_ref = torch.linalg.svd(b, full_matrices=False)
    signs = torch.sign((ub.double() * u_ref).sum(-2, keepdim=True))
    assert torch.allclose(ub.double() * signs, u_ref, atol=1e-5)
    assert torch.allclose(vh.double() * signs.mT, vh_ref, atol=1e-5)
    eye = torch.eye(12)
    assert torch.allclose(vh @ vh.mT, eye.expand(3, 12, 12), atol=1e-5)
    # rank 3 of 12: the Cholesky of the Gram matrix fails, LAPACK's SVD answers
    low = torch.randn(12, 3, generator=g) @ torch.randn(3, 50, generator=g)
    ub, vh = linalg._wide_svd(low)
    assert torch.allclose(vh @ vh.mT, eye, atol=1e-5)
    assert torch.allclose(ub @ ub.mT, eye, atol=1e-5)
