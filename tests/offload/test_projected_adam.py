"""``cpu_gemm.projected_adam_``: GaLore's project / Adam / write-back in one native call, checked
bitwise against the three kernels it chains called one by one (``mm``, ``lowrank_adam``,
``addmm_``), for both sides, strided gradients and bases, and its refusals.

Runs only where the CPU has AMX-BF16 and the native library is built.
"""

from __future__ import annotations

import pytest
import torch

from memopt.offload import cpu_gemm, cpu_lowrank

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(), reason="no AMX-BF16 on this CPU, or the native library not built"
)

HYPER = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "c2": 1.0}


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values stored row-major, column-major, or as a strided slice."""
    if how == "rows":
        return t.contiguous()
    if how == "cols":
        return t.T.contiguous().T
    big = torch.zeros(t.shape[0] * 2, t.shape[1] * 3)
    big[::2, ::3] = t
    return big[::2, ::3]


def _step_by_step(g, basis, w, m, v, right, alpha, beta):
    low = cpu_gemm.mm(g, basis.T) if right else cpu_gemm.mm(basis.T, g)
    d, _, _ = cpu_lowrank.lowrank_adam(low, m, v, norms_dim=None, **HYPER)
    if right:
        cpu_gemm.addmm_(w, d, basis, alpha=alpha, beta=beta)
    else:
        cpu_gemm.addmm_(w, basis, d, alpha=alpha, beta=beta)


def _case(rows, cols, r, right, gen):
    g = torch.randn(rows, cols, generator=gen)
    basis = torch.linalg.qr(torch.randn(max(rows, cols), r, generator=gen))[0]
    basis = basis[:cols].T if right else basis[:rows]  # r x n (right) or m x r (left)
    low = (rows, r) if right else (r, cols)
    w = torch.randn(rows, cols, generator=gen)
    m = torch.randn(low, generator=gen) * 0.1
    v = torch.rand(low, generator=gen) * 0.01
    return g, basis, w, m, v


CASES = [(512, 512, 128), (1376, 512, 128), (37, 90, 16), (5, 3, 2)]


@pytest.mark.parametrize("rows,cols,r", CASES)
@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("g_layout", ["rows", "cols", "strided"])
@pytest.mark.parametrize("b_layout", ["rows", "cols", "strided"])
def test_one_call_equals_the_three_kernels_bitwise(rows, cols, r, right, g_layout, b_layout):
    gen = torch.Generator().manual_seed(rows + cols + r + right)
    g, basis, w, m, v = _case(rows, cols, r, right, gen)
    g, basis = _layout(g, g_layout), _layout(basis, b_layout)
    w2, m2, v2 = w.clone(), m.clone(), v.clone()
    cpu_gemm.projected_adam_(g, basis, w, m, v, right=right, alpha=-0.3, beta=0.99, **HYPER)
    _step_by_step(g, basis, w2, m2, v2, right, -0.3, 0.99)
    assert torch.equal(w, w2)
    assert torch.equal(m, m2)
    assert torch.equal(v, v2)


def test_a_weight_that_is_a_slice_keeps_its_neighbours() -> None:
    gen = torch.Generator().manual_seed(3)
    g, basis, w, m, v = _case(64, 48, 8, True, gen)
    big = torch.randn(64, 60, generator=gen)
    big[:, :48] = w
    before = big.clone()
    view = big[:, :48]
    cpu_gemm.projected_adam_(g, basis, view, m.clone(), v.clone(), right=True, alpha=-1.0,
                             beta=1.0, **HYPER)  # fmt: skip
    want = w.clone()
    _step_by_step(g, basis, want, m.clone(), v.clone(), True, -1.0, 1.0)
    assert torch.equal(big[:, :48], want)
    assert torch.equal(big[:, 48:], before[:, 48:])


def test_bad_input_is_refused_and_nothing_changes() -> None:
    gen = torch.Generator().manual_seed(4)
    g, basis, w, m, v = _case(40, 30, 8, True, gen)
    saved = [t.clone() for t in (w, m, v)]
    call = dict(right=True, alpha=-1.0, beta=1.0, **HYPER)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_gemm.projected_adam_(g, basis.T, w, m, v, **call)  # a left-shaped basis
    with pytest.raises(ValueError, match="moments"):
        cpu_gemm.projected_adam_(g, basis, w, m.T, v, **call)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_gemm.projected_adam_(g, basis, w, m.T.contiguous().T, v, **call)
    with pytest.raises(ValueError, match="unit column stride"):
        cpu_gemm.projected_adam_(g, basis, w.T.contiguous().T, m, v, **call)
    with pytest.raises(ValueError, match="share memory"):
        cpu_gemm.projected_adam_(w, basis, w, m, v, **call)
    with pytest.raises(ValueError, match="fp32"):
        cpu_gemm.projected_adam_(g.double(), basis, w, m, v, **call)
    for t, s in zip((w, m, v), saved, strict=True):
        assert torch.equal(t, s)
