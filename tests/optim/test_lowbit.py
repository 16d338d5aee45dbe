"""Block-wise 8-/4-bit quantization of optimizer state (memopt.optim.lowbit.quant).

Properties of the codes, exact nearest-value search (table path == torch.bucketize),
round-trip error bounds, exact 0 and absmax, ragged sizes, nibble packing, determinism,
dtypes, state bytes, and a comparison with bitsandbytes' CPU block-wise quantizer.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch

from memopt.optim.lowbit import (
    dequantize_blockwise,
    dequantize_state,
    dynamic_map,
    linear_map,
    nearest_index,
    pack_nibbles,
    quant,
    quantize_blockwise,
    quantize_state,
    state_code,
    unpack_nibbles,
)

N = 1 << 16  # error statistics; the bytes test uses 1M elements


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # CI has 2 shared cores: many short parallel regions stall on a descheduled OpenMP thread.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _roundtrip(x: torch.Tensor, code: torch.Tensor, bs: int, bits: int = 8) -> torch.Tensor:
    q, absmax = quantize_blockwise(x, code, bs, bits=bits)
    return dequantize_blockwise(q, absmax, code, bs, x.shape, bits=bits)


def _block_absmax(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Per-element absmax of its block, for any numel."""
    flat = x.reshape(-1).float()
    pad = torch.nn.functional.pad(flat, (0, -flat.numel() % bs)).view(-1, bs)
    return pad.abs().amax(1).repeat_interleave(bs)[: flat.numel()]


def _max_gap(code: torch.Tensor) -> float:
    return float((code[1:] - code[:-1]).max())


# --- codes -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_properties(signed: bool, bits: int) -> None:
    code = dynamic_map(signed, bits)
    assert code.dtype == torch.float32 and code.shape == (2**bits,)
    assert bool((code[1:] > code[:-1]).all()), "strictly ascending"
    assert 0.0 in code.tolist() and 1.0 in code.tolist()
    assert float(code.min()) == (-1.0 if signed else 0.0) and float(code.max()) == 1.0
    # Tree structure: after sign and E zero bits plus the indicator, 2^F fraction values
    # lie in (10^-(E+1), 10^-E]: 64, 32, ..., 1 per side (signed 8-bit).
    tree = bits - 1 if signed else bits
    for e in range(tree):
        in_decade = (code > 10.0 ** -(e + 1) * (1 + 1e-6)) & (code <= 10.0**-e * (1 + 1e-6))
        assert int(in_decade.sum()) == 2 ** (tree - 1 - e), e


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_close_to_bitsandbytes(signed: bool) -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    ours, bnb = dynamic_map(signed), F.create_dynamic_map(signed=signed)
    lo = -1.0 if signed else 0.0
    y = torch.rand(N) * (1 - lo) + lo
    err = (ours[nearest_index(y, ours).long()] - y).abs()
    err_b = (bnb[nearest_index(y, bnb).long()] - y).abs()
    # Same top-decade resolution (0.9 / 64 signed, 0.9 / 128 unsigned): equal within 2 %.
    assert float(err.max()) <= 1.02 * float(err_b.max())
    assert float(err.mean()) <= 1.02 * float(err_b.mean())
    assert _max_gap(ours) <= _max_gap(bnb) * 1.001


def test_linear_map() -> None:
    s, u, u0 = linear_map(True), linear_map(False), linear_map(False, 4, zero=False)
    assert s.numel() == 255 and float(s[127]) == 0.0 and float(s[0]) == -1.0
    assert torch.equal(s, -s.flip(0))
    assert u.numel() == 256 and float(u[0]) == 0.0 and float(u[-1]) == 1.0
    assert u0.numel() == 16 and float(u0[0]) == 1 / 16 and float(u0[-1]) == 1.0
    for code in (s, u, u0):
        assert bool((code[1:] > code[:-1]).all())


def test_state_codes_cached_per_device() -> None:
    assert state_code("int8", True) is state_code("int8", True, torch.device("cpu"))
    # 8-bit second moment: the dynamic code with 10^-8 for its all-zero pattern, no zero
    u8 = state_code("int8", False)
    assert torch.equal(u8, dynamic_map(False, 8, zero=False))
    assert torch.equal(u8[1:], dynamic_map(False, 8)[1:])
    assert float(u8[0]) == torch.tensor(1e-8).item()
    assert bool((u8 > 0).all())
    assert torch.equal(state_code("int4", True), dynamic_map(True, 4))
    # 4-bit second moment: linear without zero (torchao / Li et al. 2023).
    assert torch.equal(state_code("int4", False), linear_map(False, 4, zero=False))


# --- nearest-value search -------------------------------------------------------------------


def _adversarial(code: torch.Tensor) -> torch.Tensor:
    mids = (code[:-1] + code[1:]) / 2
    inf = torch.tensor(math.inf)
    near = [mids, code, mids.nextafter(inf), mids.nextafter(-inf), code.nextafter(-inf)]
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1.0, -1.0])
    return torch.cat([*near, specials, torch.rand(200_000) * 2 - 1, torch.randn(50_000) * 1e-4])


def _codes_under_test() -> list[torch.Tensor]:
    codes = [dynamic_map(s, b) for s in (True, False) for b in (8, 4)]
    codes += [linear_map(True), linear_map(False), linear_map(False, 4, zero=False)]
    return codes


@pytest.mark.parametrize("i", range(7))
def test_table_search_equals_bucketize(i: int) -> None:
    code = _codes_under_test()[i]
    assert quant._tables(code) is not None, "the fast path must apply to memopt's own codes"
    y = _adversarial(code)
    got = nearest_index(y, code)
    assert torch.equal(got, nearest_index(y, code, "bucketize"))
    # ... and bucketize on midpoints is nearest value (ties and 1-ulp midpoint rounding aside).
    chunk = y[:20_000]
    best = (chunk[:, None] - code[None, :]).abs().amin(1)
    assert torch.allclose((code[got[:20_000].long()] - chunk).abs(), best, rtol=0, atol=1e-7)


def test_dense_code_falls_back_to_bucketize() -> None:
    code = torch.cat([torch.tensor([-1.0, 0.0]), 0.5 + torch.arange(10) * 1e-6, torch.ones(1)])
    assert quant._tables(code) is None
    y = torch.rand(10_000) * 2 - 1
    y[:10] = 0.5 + torch.arange(10) * 1e-6
    assert torch.equal(nearest_index(y, code), nearest_index(y, code, "bucketize"))


def test_tables_follow_in_place_edits_of_the_code() -> None:
    code = dynamic_map(True).clone()
    y = torch.rand(10_000) * 2 - 1
    before = nearest_index(y, code)
    code.pow_(3)  # still sorted: a different code, same tensor object
    after = nearest_index(y, code)
    assert not torch.equal(before, after)
    assert torch.equal(after, nearest_index(y, code, "bucketize"))


# --- round trips ---------------------------------------------------------------------------


def test_int8_dynamic_error_bounds() -> None:
    bs = 256
    x = torch.rand(N) * 2 - 1
    err = (_roundtrip(x, dynamic_map(True), bs) - x).abs() / _block_absmax(x, bs)
    assert float(err.max()) <= 0.9 / 64 / 2 * (1 + 1e-4)  # half the top decade's step: 0.007
    z = torch.randn(N)
    a = _block_absmax(z, bs)
    err = (_roundtrip(z, dynamic_map(True), bs) - z).abs() / a
    y = z.abs() / a
    for e in range(6):  # |y| <= 10^-E is resolved in steps of 10^-E * 0.9 / 2^(6-E)
        bound = 10.0**-e * 0.9 / 2 ** (6 - e) / 2 + 1e-7
        assert float(err[y <= 10.0**-e].max()) <= bound, e
    assert float(err[y < 0.01].max()) <= 0.05 * float(err.max())  # much finer near zero


def test_zero_and_absmax_exact() -> None:
    bs = 256
    x = torch.randn(4, bs)
    x[0, 7], x[1, 3] = 5.0, -7.0  # block maxima, positive and negative
    x[2] = 0.0  # an all-zero block
    x[3, ::2] = 0.0
    for signed, data in ((True, x), (False, x.abs())):
        q, absmax = quantize_blockwise(data, dynamic_map(signed), bs)
        assert float(absmax[2]) == 0.0
        r = dequantize_blockwise(q, absmax, dynamic_map(signed), bs, data.shape)
        assert torch.isfinite(r).all()
        assert torch.equal(r[data == 0], torch.zeros_like(r[data == 0]))
        peak = data.abs().argmax(1)
        rows = torch.arange(4)
        assert torch.equal(r[rows, peak], data[rows, peak])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 3, 127, 255, 257, 1000, 3 * 256 + 1])
def test_ragged_sizes_match_padded(n: int, bits: int) -> None:
    bs = quant.DEFAULT_BLOCK_SIZE[bits]
    code = dynamic_map(True, bits)
    x = torch.randn(n)
    q, absmax = quantize_blockwise(x, code, bits=bits)
    assert absmax.numel() == -(-n // bs) and q.numel() == (-(-n // 2) if bits == 4 else n)
    padded = torch.nn.functional.pad(x, (0, -n % bs))
    q_pad, absmax_pad = quantize_blockwise(padded, code, bits=bits)
    assert torch.equal(absmax, absmax_pad)
    unpack = (lambda t: unpack_nibbles(t, n)) if bits == 4 else (lambda t: t[:n])
    assert torch.equal(unpack(q), unpack(q_pad))
    r = dequantize_blockwise(q, absmax, code, None, (n,), bits=bits)
    assert (r - x).abs().max() <= _max_gap(code) / 2 * float(x.abs().max()) * (1 + 1e-5)


def test_chunked_passes_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 70_001)
    for bits in (8, 4):
        code = dynamic_map(False, bits)
        monkeypatch.setattr(quant, "_CPU_CHUNK", 1 << 30)
        q1, a1 = quantize_blockwise(x.abs(), code, bits=bits)
        r1 = dequantize_blockwise(q1, a1, code, None, x.shape, bits=bits)
        monkeypatch.setattr(quant, "_CPU_CHUNK", 1000)  # many passes, odd block counts
        q2, a2 = quantize_blockwise(x.abs(), code, bits=bits)
        assert torch.equal(q1, q2) and torch.equal(a1, a2)
        assert torch.equal(r1, dequantize_blockwise(q2, a2, code, None, x.shape, bits=bits))


def test_pack_unpack_nibbles() -> None:
    assert pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8)).tolist() == [0x12, 0xF0]
    for n in (1, 2, 7, 1000, 1001):
        codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
        packed = pack_nibbles(codes)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 2)
        assert torch.equal(unpack_nibbles(packed, n), codes)


def test_int4_roundtrip() -> None:
    x = torch.randn(100_001)
    for signed, data in ((True, x), (False, x.square())):
        code = dynamic_map(signed, 4)
        q, absmax = quantize_blockwise(data, code, bits=4)
        flat = torch.nn.functional.pad(data, (0, -data.numel() % 128)).view(-1, 128)
        ref = nearest_index((flat / flat.abs().amax(1, keepdim=True)).view(-1), code)
        assert torch.equal(q, pack_nibbles(ref[: data.numel()]))
        r = dequantize_blockwise(q, absmax, code, None, data.shape, bits=4)
        err = (r - data).abs() / _block_absmax(data, 128)
        assert float(err.max()) <= _max_gap(code) / 2 * (1 + 1e-5)


def test_deterministic_and_idempotent() -> None:
    x = torch.randn(300, 301)
    for kind in ("int8", "int4"):
        for signed, data in ((True, x), (False, x.square())):
            d1, d2 = quantize_state(data, kind, signed), quantize_state(data.clone(), kind, signed)
            assert all(torch.equal(d1[k], d2[k]) for k in d1)
            r = dequantize_state(d1, data.shape, kind, signed)
            d3 = quantize_state(r, kind, signed)  # resume re-quantizes to the same bits
            assert all(torch.equal(d1[k], d3[k]) for k in d1), (kind, signed)


def test_dtypes() -> None:
    x = torch.randn(1000, 33)
    code = dynamic_map(True)
    xb = x.bfloat16()
    q, a = quantize_blockwise(xb, code)
    q32, a32 = quantize_blockwise(xb.float(), code)
    assert torch.equal(q, q32) and torch.equal(a, a32) and a.dtype == torch.float32
    q64, _ = quantize_blockwise(x.double(), code)
    assert torch.equal(q64, quantize_blockwise(x, code)[0])
    r16 = dequantize_blockwise(q, a, code, None, x.shape, torch.bfloat16)
    assert r16.dtype == torch.bfloat16 and r16.shape == x.shape
    assert torch.equal(r16, dequantize_blockwise(q, a, code, None, x.shape).bfloat16())


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    x = torch.randn(100_003)
    for kind in ("int8", "int4"):
        cpu = quantize_state(x, kind, True)
        gpu = quantize_state(x.cuda(), kind, True)
        assert all(gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k]) for k in cpu)
        r = dequantize_state(gpu, x.shape, kind, True)
        assert torch.equal(r.cpu(), dequantize_state(cpu, x.shape, kind, True))


# --- state helpers ------------------------------------------------------------------------


def test_state_bytes() -> None:
    x = torch.randn(1 << 20)
    fp32 = x.numel() * 4
    for kind, limit in (("int8", 0.27), ("int4", 0.14)):
        d = quantize_state(x, kind, True)
        nbytes = sum(t.numel() * t.element_size() for t in d.values())
        assert nbytes <= limit * fp32, (kind, nbytes / fp32)


def test_state_is_tensor_only_and_loads_weights_only() -> None:
    x = torch.randn(64, 100)
    for kind in ("int8", "int4"):
        for signed, data in ((True, x), (False, x.square())):
            d = quantize_state(data, kind, signed)
            assert set(d) == {"q", "absmax"}
            buf = io.BytesIO()
            torch.save(d, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=True)
            r = dequantize_state(loaded, data.shape, kind, signed)
            assert torch.equal(r, dequantize_state(d, data.shape, kind, signed))
            zeros = quantize_state(torch.zeros_like(data), kind, signed)
            assert not dequantize_state(zeros, data.shape, kind, signed).any()


def test_errors() -> None:
    x, code = torch.randn(10), dynamic_map(True)
    with pytest.raises(ValueError, match="kind"):
        quantize_state(x, "int2", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        quantize_blockwise(x, code, bits=6)
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(x, code, 0)
    with pytest.raises(ValueError, match="16"):
        quantize_blockwise(x, code, bits=4)  # a 256-value code in 4 bits
    with pytest.raises(ValueError, match="bits"):
        dynamic_map(True, 9)
    q, a = quantize_blockwise(x, code)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_blockwise(q, a, code, None, (11,))
    with pytest.raises(ValueError, match="ascending"):
        nearest_index(x, code.flip(0))


# --- bitsandbytes reference -----------------------------------------------------------------


@pytest.mark.parametrize("data", ["uniform", "normal", "square"])
def test_error_vs_bitsandbytes(data: str) -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    x = {"uniform": torch.rand(N) * 2 - 1, "normal": torch.randn(N), "square": torch.randn(N) ** 2}
    x_ = x[data]
    signed = data != "square"
    code_b = F.create_dynamic_map(signed=signed)
    qb, st = F.quantize_blockwise(x_, code=code_b, blocksize=256)
    err_b = (F.dequantize_blockwise(qb, st) - x_).abs()
    err = (_roundtrip(x_, dynamic_map(signed), 256) - x_).abs()
    assert float(err.mean()) <= 1.5 * float(err_b.mean())
    assert float(err.mean()) <= 1.02 * float(err_b.mean())  # in fact equal to ~1 %
    # With bnb's own code, exact nearest search is never worse than bnb's CPU kernel.
    err_same_code = (_roundtrip(x_, code_b, 256) - x_).abs()
    assert bool((err_same_code <= err_b + 1e-6 * _block_absmax(x_, 256)).all())


def test_int4_error_vs_bitsandbytes_4bit_dynamic() -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(N)
    code_b = F.create_dynamic_map(True, 3, 4)  # torchao's 4-bit signed code
    qb, st = F.quantize_blockwise(x, code=code_b, blocksize=128)
    err_b = (F.dequantize_blockwise(qb, st) - x).abs().mean()
    err = (_roundtrip(x, dynamic_map(True, 4), 128, bits=4) - x).abs().mean()
    assert float(err) <= 1.5 * float(err_b)
