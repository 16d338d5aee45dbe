"""The native one-pass low-rank Adam (``memopt.offload.cpu_lowrank``) against the torch path
(``MEMOPT_KERNELS=torch``), which ``kernels.adam_update`` uses where the native one cannot go."""

from __future__ import annotations

import pytest
import torch

from memopt.offload import cpu_lowrank
from memopt.offload.cpu_adam import native_available
from memopt.optim import kernels

pytestmark = pytest.mark.skipif(not native_available(), reason="native library not built")


def _case(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(shape, generator=g)
    return low, 0.1 * torch.randn(shape, generator=g), 0.01 * torch.rand(shape, generator=g)


def _update(mode: str, monkeypatch: pytest.MonkeyPatch, *args, **kw):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMOPT_KERNELS", mode)
    return kernels.adam_update(*args, **kw)


@pytest.mark.parametrize("shape", [(64, 96), (5, 1000), (1, 3), (130, 17)])
@pytest.mark.parametrize("norms_dim", [None, 0, 1])
@pytest.mark.parametrize("eps_mode", ["torch", "galore"])
def test_matches_torch_path(shape, norms_dim, eps_mode, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    low, m, v = _case(shape, 0)
    m2, v2 = m.clone(), v.clone()
    kw = dict(step=3, beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-3, eps_mode=eps_mode,
              norms_dim=norms_dim)  # fmt: skip
    ref = _update("torch", monkeypatch, low, m, v, **kw)
    got = _update("auto", monkeypatch, low, m2, v2, **kw)
    assert got[1] == ref[1]  # the step size is computed in Python either way
    for a, b in ((got[0], ref[0]), (m2, m), (v2, v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    if norms_dim is None:
        assert got[2] is None and got[3] is None
    else:
        n = shape[1] if norms_dim == 0 else shape[0]
        assert got[2].shape == (n,) and got[3].shape == (n,)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=0)
        torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=0)


def test_dispatch_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    low, m, v = _case((8, 16), 1)
    assert cpu_lowrank.usable(low, m, v)
    assert not cpu_lowrank.usable(low.t(), m, v)  # not contiguous
    assert not cpu_lowrank.usable(low.bfloat16(), m, v)
    calls = []
    real = cpu_lowrank.lowrank_adam
    monkeypatch.setattr(
        cpu_lowrank, "lowrank_adam", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    kw = dict(step=1, beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-3, eps_mode="torch")
    _update("auto", monkeypatch, low, m, v, **kw)
    _update("torch", monkeypatch, low, m.clone(), v.clone(), **kw)  # forced reference
    _update("auto", monkeypatch, low.t(), m.t(), v.t(), **kw)  # strided: torch path
    assert len(calls) == 1


def test_rejects_bad_input() -> None:
    low, m, v = _case((4, 4), 2)
    with pytest.raises(ValueError, match="shapes"):
        cpu_lowrank.lowrank_adam(low, m[:2], v, beta1=0.9, beta2=0.99, eps=1e-8, c2=1.0,
                                 norms_dim=None)  # fmt: skip
    with pytest.raises(ValueError, match="fp32 contiguous"):
        cpu_lowrank.lowrank_adam(low.double(), m, v, beta1=0.9, beta2=0.99, eps=1e-8, c2=1.0,
                                 norms_dim=None)  # fmt: skip



@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
@pytest.mark.parametrize("norms_dim", [None, 0, 1])
def test_empty_matrices(shape: tuple[int, int], norms_dim: int | None) -> None:
    z = torch.zeros(shape)
    d, num, den = cpu_lowrank.lowrank_adam(
        z, z.clone(), z.clone(), beta1=0.9, beta2=0.999, eps=1e-8, c2=1.0, norms_dim=norms_dim
    )
    assert d.shape == shape
    if norms_dim is not None:
        n = shape[1] if norms_dim == 0 else shape[0]
        assert num is not None and den is not None
        assert torch.equal(num, torch.zeros(n)) and torch.equal(den, torch.zeros(n))

# -- channel sums of squares (APOLLO's limiter reads G once for them) ------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (130, 17), (17, 300), (512, 1376), (1376, 64)])
@pytest.mark.parametrize("dim", [0, 1])
def test_channel_sumsq_matches_float64(shape: tuple[int, int], dim: int) -> None:
    g = 3.0 * torch.randn(shape, generator=torch.Generator().manual_seed(7))
    got = cpu_lowrank.channel_sumsq(g, dim)
    want = (g.double() ** 2).sum(dim)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=0)


def test_channel_sumsq_strided_rows_and_zeros() -> None:
    base = torch.randn(40, 300, generator=torch.Generator().manual_seed(3))
    g = base[:, 10:210]  # rows 300 apart, 200 wide: the kernel must not read the gap
    base[:, :10] = 1e30
    base[:, 210:] = 1e30
    for dim in (0, 1):
        torch.testing.assert_close(
            cpu_lowrank.channel_sumsq(g, dim).double(), (g.double() ** 2).sum(dim), rtol=2e-7,
            atol=0,
        )  # fmt: skip
    assert cpu_lowrank.channel_sumsq(torch.zeros(4, 9), 0).eq(0).all()
    for shape in ((0, 5), (3, 0)):  # empty matrices: empty or all-zero sums, no error
        for dim in (0, 1):
            want = torch.zeros(shape[1] if dim == 0 else shape[0])
            assert torch.equal(cpu_lowrank.channel_sumsq(torch.zeros(shape), dim), want)


def test_channel_norms_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.randn(33, 70, generator=torch.Generator().manual_seed(5))
    calls = []
    real = cpu_lowrank.channel_sumsq
    monkeypatch.setattr(cpu_lowrank, "channel_sumsq", lambda *a: calls.append(1) or real(*a))
    for dim in (0, 1):
        monkeypatch.setenv("MEMOPT_KERNELS", "auto")
        got = kernels.channel_norms(g, dim)
        monkeypatch.setenv("MEMOPT_KERNELS", "torch")
        want = kernels.channel_norms(g, dim)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert len(calls) == 2  # native under auto, torch's vector_norm when forced
    monkeypatch.setenv("MEMOPT_KERNELS", "auto")
    kernels.channel_norms(g.t(), 0)  # columns not contiguous: torch path
    kernels.channel_norms(g.double(), 0)
    assert len(calls) == 2


def test_channel_sumsq_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="dim must be 0 or 1"):
        cpu_lowrank.channel_sumsq(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        cpu_lowrank.channel_sumsq(torch.ones(3, 4).t(), 0)
    with pytest.raises(ValueError, match="2-D fp32"):
        cpu_lowrank.channel_sumsq(torch.ones(2, 2, dtype=torch.float64), 0)
