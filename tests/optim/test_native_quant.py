"""Native int8 block quantization (``memopt.offload.cpu_lowbit.q8_quantize`` /
``q8_dequantize``) behind ``quantize_blockwise`` / ``dequantize_blockwise``, against the torch
code (``MEMOPT_KERNELS=torch``).

Everything is compared bit for bit: codes, the absmax bit patterns and the dequantized
values' bit patterns (so NaN and -0.0 count too)."""

from __future__ import annotations

import pytest
import torch

from memopt.offload import cpu_lowbit
from memopt.optim import ApolloAdamW, GaLoreAdamW, kernels
from memopt.optim.kernels import lowbit_adam
from memopt.optim.lowbit import (
    dequantize_blockwise,
    dynamic_map,
    quant,
    quantize_blockwise,
    state_code,
)
from memopt.optim.lowbit import native as native_quant
from tests.optim._roundtrip import reload

pytestmark = pytest.mark.skipif(not cpu_lowbit.available(), reason="native library not built")

QKEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (int view of the same width)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    return torch.equal(a, b)


@pytest.fixture(params=[True, False], ids=["vector", "table"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts native calls; runs each test with the AVX-512 register lookups (where the CPU
    has them) and with the table search / plain loads."""
    seen: list[str] = []
    q_real, d_real = cpu_lowbit.q8_quantize, cpu_lowbit.q8_dequantize

    def q(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append("q")
        return q_real(*args, **kw, vector_search=request.param)

    def d(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append("d")
        return d_real(*args, **kw, vector_lookup=request.param)

    monkeypatch.setattr(cpu_lowbit, "q8_quantize", q)
    monkeypatch.setattr(cpu_lowbit, "q8_dequantize", d)
    return seen


def _roundtrip(
    mode: str, monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, signed: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    monkeypatch.setenv("MEMOPT_KERNELS", mode)
    code = state_code("int8", signed)
    q, absmax = quantize_blockwise(x, code)
    return q, absmax, dequantize_blockwise(q, absmax, code, None, x.shape, dtype)


def _data(n: int, signed: bool, seed: int) -> torch.Tensor:
    """Random values at mixed scales, an all-zero block, a tiny and a huge block."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    if n > 1024:
        x[256:512] = 0.0
        x[512:768] *= 1e-42  # subnormal magnitudes
        x[768:1024] *= 1e30
    return x if signed else x.abs()


@pytest.mark.parametrize("n", [1, 255, 257, 5000, 40_001, 70_000 + 3])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_matches_torch(n: int, signed: bool, monkeypatch, native) -> None:  # type: ignore[no-untyped-def]
    x = _data(n, signed, n)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = _roundtrip("torch", monkeypatch, x, signed, dtype)
        assert not native
        got = _roundtrip("auto", monkeypatch, x, signed, dtype)
        assert native == ["q", "d"]
        native.clear()
        for a, b in zip(got, ref, strict=True):
            assert _same(a, b)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_ties_go_to_the_lower_code(signed: bool, monkeypatch, native) -> None:  # type: ignore[no-untyped-def]
    """y exactly on each midpoint and one ulp either side; each block starts with its absmax
    (+-1, so y = x exactly)."""
    mids = lowbit_adam.midpoints(signed)
    vals = torch.cat([mids, mids.nextafter(mids + 2), mids.nextafter(mids - 2)])
    rows = vals.view(-1, 255)
    lead = torch.ones(rows.shape[0], 1) if not signed else torch.tensor([[1.0], [-1.0], [1.0]])
    x = torch.cat([lead, rows], dim=1).reshape(-1)
    if not signed:
        x = x.clamp(min=0.0)
    ref = _roundtrip("torch", monkeypatch, x, signed, torch.float32)
    got = _roundtrip("auto", monkeypatch, x, signed, torch.float32)
    assert native
    for a, b in zip(got, ref, strict=True):
        assert _same(a, b)


def test_non_finite_blocks(monkeypatch, native) -> None:  # type: ignore[no-untyped-def]
    """Blocks holding inf or NaN: the same absmax (inf / NaN), codes and values."""
    x = _data(256 * 6 + 17, True, 3)
    x[3] = float("inf")  # block 0: inf absmax
    x[300], x[301] = float("-inf"), float("nan")  # block 1: NaN absmax
    x[600] = float("-inf")
    x[1000:1010] = float("nan")
    x[-1] = float("inf")  # short last block
    for signed in (True, False):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = _roundtrip("torch", monkeypatch, x, signed, dtype)
            got = _roundtrip("auto", monkeypatch, x, signed, dtype)
            for a, b in zip(got, ref, strict=True):
                assert _same(a, b)
            assert not got[2][:256].float().isfinite().any()
    assert native


def test_other_dtypes_and_equal_codes(monkeypatch, native) -> None:  # type: ignore[no-untyped-def]
    """bf16 / fp16 input is converted to fp32 first; a code equal to the state code by value
    (a fresh ``dynamic_map``) takes the native path too."""
    x = _data(3000, True, 7).clamp(-6e4, 6e4)
    code = dynamic_map(True, 8)
    for dtype in (torch.bfloat16, torch.float16):
        xs = x.to(dtype).view(30, 100)
        monkeypatch.setenv("MEMOPT_KERNELS", "torch")
        ref = quantize_blockwise(xs, code)
        monkeypatch.setenv("MEMOPT_KERNELS", "auto")
        got = quantize_blockwise(xs, code)
        assert all(_same(a, b) for a, b in zip(got, ref, strict=True))
    assert native.count("q") == 2


def test_only_where_it_applies(monkeypatch, native) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMOPT_KERNELS", "auto")
    x = _data(5000, True, 1)
    code = state_code("int8", True)
    quantize_blockwise(x, code, 128)  # another block size
    quantize_blockwise(x.view(50, 100).t(), code)  # not contiguous
    quantize_blockwise(x, torch.linspace(-1, 1, 256))  # another code
    quantize_blockwise(x, state_code("int4", True), bits=4)
    state = quant.quantize_state(x, "int8", signed=True)
    q, absmax = state["q"], state["absmax"]
    assert native == ["q"]
    dequantize_blockwise(q, absmax, code, None, x.shape, torch.float64)  # dtype it lacks
    assert native == ["q"]
    dequantize_blockwise(q, absmax, code, None, x.shape)
    assert native == ["q", "d"]


def test_forced_torch_bypasses_native(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def refuse(*args, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("native quantization ran under MEMOPT_KERNELS=torch")

    monkeypatch.setattr(cpu_lowbit, "q8_quantize", refuse)
    monkeypatch.setattr(cpu_lowbit, "q8_dequantize", refuse)
    x = _data(5000, True, 2)
    q, absmax, _ = _roundtrip("torch", monkeypatch, x, True, torch.float32)
    assert q.dtype == torch.uint8 and absmax.numel() == 20
    with pytest.raises(AssertionError, match="native quantization ran"):
        _roundtrip("auto", monkeypatch, x, True, torch.float32)


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s) * 0.1) for s in ((256, 96), (80, 300))]


def _make(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    group = {"params": params, "rank": 32, "update_proj_gap": 2}
    if name == "galore":
        return GaLoreAdamW([group], lr=1e-2, weight_decay=0.1, state_dtype="int8")
    return ApolloAdamW([group], lr=1e-2, weight_decay=0.1, state_dtype="int8")


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], start: int, n: int) -> None:
    for s in range(start, start + n):
        gen = torch.Generator().manual_seed(s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_low_rank_optimizers_and_resume(name: str, monkeypatch, native) -> None:  # type: ignore[no-untyped-def]
    """int8 state through the native quantization against ``MEMOPT_KERNELS=torch``, with a
    save / load in the middle. The native low-rank Adam (``cpu_lowrank``), which also runs
    under ``auto``, rounds its own way (``test_native_lowrank`` checks it to a tolerance),
    so it is held on the torch code here: quantization is the only native part."""
    monkeypatch.setattr(kernels, "_native_cpu", lambda *ts: False)
    monkeypatch.setenv("MEMOPT_KERNELS", "torch")
    ref = _params()
    ref_opt = _make(name, ref)
    _run(ref_opt, ref, 0, 5)
    assert not native

    monkeypatch.setenv("MEMOPT_KERNELS", "auto")
    params = _params()
    opt = _make(name, params)
    _run(opt, params, 0, 3)
    params2, opt2 = reload(params, opt, lambda ps: _make(name, ps))
    _run(opt2, params2, 3, 2)
    assert "q" in native and "d" in native
    for a, b in zip(ref, params2, strict=True):
        assert _same(a.detach(), b.detach())
        sa, sb = ref_opt.state[a], opt2.state[b]
        assert all(k in sa for k in QKEYS)
        for key in QKEYS:
            assert _same(sa[key], sb[key]), key


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_all_native_kernels_with_and_without_native_quant(name: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Under ``auto`` with every native kernel on, turning the native quantization off
    changes nothing: parameters and state stay bit-identical."""
    monkeypatch.setenv("MEMOPT_KERNELS", "auto")
    runs = []
    for on in (True, False):
        monkeypatch.setattr(native_quant, "native_on", lambda on=on: on and cpu_lowbit.available())
        params = _params()
        opt = _make(name, params)
        _run(opt, params, 0, 4)
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb, strict=True):
        assert _same(a.detach(), b.detach())
        for key in QKEYS:
            assert _same(oa.state[a][key], ob.state[b][key]), key
