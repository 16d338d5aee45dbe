"""memopt's AMX bf16 GEMM (``memopt.offload.cpu_gemm``) against float64 sums of the bf16-rounded
operands: layouts (contiguous, transposed views, slices), edges, alpha / beta, threads, errors.

Runs only where the CPU has AMX-BF16 and the native library is built; elsewhere the
projection GEMMs take oneDNN's route, which ``tests/optim/test_matmul_dtype.py`` covers.
"""

from __future__ import annotations

import pytest
import torch

from memopt.offload import cpu_gemm

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(), reason="no AMX-BF16 on this CPU, or the native library not built"
)


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.bfloat16().double() @ b.bfloat16().double()


def _operand(rows: int, cols: int, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A rows x cols fp32 operand stored as asked: row-major, a transposed view, or a slice
    of a wider matrix with neither stride 1."""
    if layout == "rows":
        return torch.randn(rows, cols, generator=gen)
    if layout == "cols":
        return torch.randn(cols, rows, generator=gen).T
    return torch.randn(rows * 2, cols * 3, generator=gen)[::2, ::3]


SHAPES = [(128, 512, 1376), (1376, 512, 128), (512, 128, 1376), (37, 45, 53), (1, 7, 3),
          (100, 1, 33), (16, 32, 16), (33, 65, 17), (3, 2000, 5)]  # fmt: skip


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("la", ["rows", "cols", "strided"])
@pytest.mark.parametrize("lb", ["rows", "cols", "strided"])
def test_products_match_float64_of_the_rounded_operands(m, k, n, la, lb) -> None:
    gen = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    a, b = _operand(m, k, la, gen), _operand(k, n, lb, gen)
    exact = _exact(a, b)
    got = cpu_gemm.mm(a, b)
    scale = exact.abs().max().item() + 1e-30
    assert (got.double() - exact).abs().max().item() / scale < 1e-6
    c = torch.randn(m, n, generator=gen)
    want = 0.75 * c.double() - 0.5 * exact
    cpu_gemm.addmm_(c, a, b, alpha=-0.5, beta=0.75)
    assert (c.double() - want).abs().max().item() / (want.abs().max().item() + 1e-30) < 1e-6


def test_rounding_is_bf16_nearest_even_on_every_packing_path() -> None:
    """A x 1: each output is one rounded input. Values from torch's own bf16 rounding cover
    ties and overflow on each packer's vector path and on the scalar path (no unit stride).
    Subnormal inputs become zeros (the AVX512-BF16 conversion's rule, kept by the scalar
    path too); a zero's sign is not compared (the tiles' sums start from +0)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-20, 20, (4096,), generator=gen)
    halfway = (x.bfloat16().float().view(torch.int32) | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 3.0e38, -3.3e38, float("inf"), -float("inf")])
    x = torch.cat([x, halfway[:512], special, torch.tensor([1e-40, -1e-40])])
    want = x.bfloat16().float()
    want[-2:] = torch.tensor([0.0, -0.0])
    one = torch.ones(1, 1)
    strided = torch.zeros(x.numel() * 2, 2)
    strided[::2, 1] = x
    wide = torch.zeros(x.numel(), 3)
    wide[:, 1] = x
    a_layouts = {  # M x 1 with K = 1: the A packers
        "rows": x[:, None],
        "rows, wide": wide[:, 1:2],
        "columns contiguous along M": x[None, :].T,
        "scalar": strided[::2, 1::2],
    }
    for name, a in a_layouts.items():
        got = cpu_gemm.mm(a, one)[:, 0]
        assert torch.equal(got, want), name
    b_layouts = {  # 1 x N with K = 1: the B packers
        "rows": x[None, :],
        "columns contiguous along K": strided[::2, 1:2].T,
        "scalar": strided[::2, 1::2].T,
    }
    for name, b in b_layouts.items():
        got = cpu_gemm.mm(one, b)[0]
        assert torch.equal(got, want), name


def test_nan_propagates() -> None:
    a = torch.randn(40, 64)
    a[3, 5] = float("nan")
    out = cpu_gemm.mm(a, torch.randn(64, 48))
    assert out[3].isnan().all() and not out[torch.arange(40) != 3].isnan().any()


def test_beta_zero_ignores_out_and_k_zero_scales_it() -> None:
    a, b = torch.randn(20, 30), torch.randn(30, 40)
    out = torch.full((20, 40), float("nan"))
    cpu_gemm.addmm_(out, a, b, alpha=2.0, beta=0.0)
    torch.testing.assert_close(out.double(), 2 * _exact(a, b), rtol=1e-6, atol=1e-6)
    out = torch.randn(20, 40)
    before = out.clone()
    cpu_gemm.addmm_(out, torch.empty(20, 0), torch.empty(0, 40), alpha=3.0, beta=0.5)
    assert torch.equal(out, before * 0.5)
    assert cpu_gemm.mm(torch.empty(0, 8), torch.randn(8, 5)).shape == (0, 5)


def test_out_slice_of_a_wider_matrix_leaves_the_rest_alone() -> None:
    a, b = torch.randn(70, 96), torch.randn(96, 50)
    big = torch.randn(70, 80)
    before = big.clone()
    cpu_gemm.addmm_(big[:, 10:60], a, b, alpha=1.0, beta=1.0)
    assert torch.equal(big[:, :10], before[:, :10]) and torch.equal(big[:, 60:], before[:, 60:])
    want = before[:, 10:60].double() + _exact(a, b)
    torch.testing.assert_close(big[:, 10:60].double(), want, rtol=1e-6, atol=1e-5)


def test_thread_count_does_not_change_the_result() -> None:
    """Each output block sums its K steps in the same order whoever computes it."""
    a, b = torch.randn(300, 520), torch.randn(520, 260)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemm.mm(a, b)
        torch.set_num_threads(max(2, threads))
        many = cpu_gemm.mm(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_bad_input_is_refused_with_the_reason() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with pytest.raises(ValueError, match="shapes"):
        cpu_gemm.mm(a, torch.randn(15, 4))
    with pytest.raises(ValueError, match="2-D fp32 CPU"):
        cpu_gemm.mm(a.double(), b.double())
    with pytest.raises(ValueError, match="unit column stride"):
        cpu_gemm.addmm_(torch.zeros(4, 8).T, a, b)
    x = torch.randn(16, 16)
    with pytest.raises(ValueError, match="must not share memory"):
        cpu_gemm.addmm_(x, x, torch.randn(16, 16))
    with pytest.raises(ValueError, match="must not share memory"):
        cpu_gemm.addmm_(x[:, :8], torch.randn(16, 4), x[:4, 8:])
