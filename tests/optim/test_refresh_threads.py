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
