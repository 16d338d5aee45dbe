"""memopt.offload.cpu_adam: native kernel (every ISA body this CPU runs) vs the torch fallback
vs torch.optim.AdamW / a float64 reference; bf16/fp16 copy-back bit-exact against torch's
round-to-nearest-even; low-precision gradients; the fallback when the library is absent.

Set MEMOPT_REQUIRE_NATIVE=1 to make a missing native build fail instead of skip.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from memopt.offload import cpu_adam as ca

SIZES = [1, 7, 15, 16, 17, 33, 1000, 4097, ca.CHUNK + 3, 3 * ca.CHUNK + 129]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
NATIVE_ISAS = ca.available_isas()


def _require_native() -> None:
    if not ca.native_available():
        if os.environ.get("MEMOPT_REQUIRE_NATIVE") == "1":
            pytest.fail("MEMOPT_REQUIRE_NATIVE=1 but the native CPU Adam did not load")
        pytest.skip("native CPU Adam not built")


@pytest.fixture(params=["scalar", "avx2", "avx512", "torch"])
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each path in turn, forced through MEMOPT_CPU_ADAM_ISA (skipped where unsupported)."""
    name = request.param
    if name != "torch":
        _require_native()
        if name not in NATIVE_ISAS:
            pytest.skip(f"this CPU has no {name} (has {NATIVE_ISAS})")
    monkeypatch.setenv(ca.ENV_ISA, name)
    return name


def _state(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * (0.1 + i) for i in range(3)]
    return p, grads


def _reference(p0: torch.Tensor, grads: list[torch.Tensor], eps_mode: str) -> torch.Tensor:
    """float64 AdamW, written out from memopt.optim._functional's two eps placements."""
    p = p0.double()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    b1, b2, lr, wd, eps = HP["beta1"], HP["beta2"], HP["lr"], HP["weight_decay"], HP["eps"]
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if eps_mode == "torch":
            p = p * (1 - lr * wd) - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps)
        else:
            p = (p - lr * math.sqrt(bc2) / bc1 * m / (v.sqrt() + eps)) * (1 - lr * wd)
    return p


def _run(p0: torch.Tensor, grads: list[torch.Tensor], eps_mode: str, **kw: object) -> torch.Tensor:
    p = p0.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        ca.cpu_adamw_step_(p, g, m, v, step=t, eps_mode=eps_mode, **HP, **kw)  # type: ignore[arg-type]
    return p


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("eps_mode", ["torch", "galore"])
def test_matches_float64_reference(isa: str, n: int, eps_mode: str) -> None:
    p0, grads = _state(n)
    got = _run(p0, grads, eps_mode)
    assert ca.selected_isa() == isa
    torch.testing.assert_close(got.double(), _reference(p0, grads, eps_mode), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [17, 4097, ca.CHUNK + 3])
def test_torch_mode_matches_torch_optim_adamw(isa: str, n: int) -> None:
    p0, grads = _state(n, seed=1)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW(
        [ref], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
        weight_decay=HP["weight_decay"], foreach=False,
    )  # fmt: skip
    for g in grads:
        ref.grad = g.clone()
        opt.step()
    torch.testing.assert_close(_run(p0, grads, "torch"), ref.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_grads(isa: str, low: torch.dtype) -> None:
    p0, grads = _state(ca.CHUNK + 37, seed=2)
    grads_low = [g.to(low) for g in grads]
    got = _run(p0, grads_low, "galore")
    want = _reference(p0, [g.float() for g in grads_low], "galore")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 16, ca.CHUNK + 3])  # scalar tail and every vector body
def test_moment_weights_are_one_minus_beta_in_double(isa: str, n: int) -> None:
    # After one step from zero moments with g = 1, m = 1 - b1 and v = 1 - b2 as torch rounds
    # them (taken in double, then float32). 1.0f - float(0.999) is 1.3e-5 off in relative terms.
    p, g = torch.zeros(n), torch.ones(n)
    m, v = torch.zeros(n), torch.zeros(n)
    ca.cpu_adamw_step_(p, g, m, v, step=1, **HP)
    assert torch.equal(m, torch.full((n,), 1 - HP["beta1"]))
    assert torch.equal(v, torch.full((n,), 1 - HP["beta2"]))


def _special_values(low: torch.dtype) -> torch.Tensor:
    """Ties, near-ties, subnormals, overflow, signed zeros, inf and NaN for ``low``."""
    if low == torch.bfloat16:
        bits = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x00000001,
                0x807FFFFF, 0x3F80FFFF, 0x7F7F8000]  # fmt: skip
    else:
        bits = [0x3F801000, 0x3F803000, 0x477FF000, 0x477FEFFF, 0x33800000, 0x33800001,
                0x387FC000, 0x38801000, 0x337FFFFF]  # fmt: skip
    ties = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    edge = torch.tensor([0.0, -0.0, 1.0, -1.5, float("inf"), -float("inf"), float("nan"), 1e-40])
    rand = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 100
    tiny = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 1e-6
    return torch.cat([ties, -ties, edge, rand, tiny])


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_copy_back_is_round_to_nearest_even(isa: str, low: torch.dtype) -> None:
    # lr = 0 and no decay leave p unchanged, so out_lowp must equal p.to(low) bit for bit.
    p = _special_values(low)
    m, v, g = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    out = torch.empty(p.shape, dtype=low)
    want = p.to(low)
    ca.cpu_adamw_step_(p, g, m, v, step=1, lr=0.0, weight_decay=0.0, out_lowp=out)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [3 * ca.CHUNK + 129, (1 << 22) + 77])  # the second streams
@pytest.mark.parametrize("offset", [0, 1])  # 1: a misaligned copy (no streaming stores)
def test_copy_back_after_a_real_step(isa: str, low: torch.dtype, n: int, offset: int) -> None:
    gen = torch.Generator().manual_seed(5)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    out = torch.empty(n + offset, dtype=low)[offset:]
    ca.cpu_adamw_step_(p, g, m, v, step=1, **HP, out_lowp=out)
    assert torch.equal(out.view(torch.int16), p.to(low).view(torch.int16))


def test_tensor_lists_match_single_calls(isa: str) -> None:
    sizes = [5, 300, ca.CHUNK + 1, 0, 64]
    ps = [torch.randn(n) for n in sizes]
    gs = [torch.randn(n).bfloat16() for n in sizes]
    one = [(p.clone(), torch.zeros(p.numel()), torch.zeros(p.numel())) for p in ps]
    many = [(p.clone(), torch.zeros(p.numel()), torch.zeros(p.numel())) for p in ps]
    outs = [torch.empty(n, dtype=torch.float16) for n in sizes]
    for (p, m, v), g in zip(one, gs, strict=True):
        ca.cpu_adamw_step_(p, g, m, v, step=2, **HP)
    ca.cpu_adamw_step_(
        [x[0] for x in many], gs, [x[1] for x in many], [x[2] for x in many],
        step=2, **HP, out_lowp=outs,
    )  # fmt: skip
    for a, b, o in zip(one, many, outs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        assert torch.equal(o, b[0].half())


def test_threads_do_not_change_the_result() -> None:
    _require_native()
    p0, grads = _state(5 * ca.CHUNK + 11, seed=6)
    one = _run(p0, grads, "torch", num_threads=1)
    two = _run(p0, grads, "torch", num_threads=2)
    assert torch.equal(one, two)


def test_native_and_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_native()
    p0, grads = _state(2 * ca.CHUNK + 5, seed=7)
    native = _run(p0, grads, "galore")
    monkeypatch.setenv(ca.ENV_ISA, "torch")
    fallback = _run(p0, grads, "galore")
    torch.testing.assert_close(native, fallback, atol=1e-6, rtol=1e-5)


def test_fallback_when_library_is_absent(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # Point the loader at an empty directory: as if the install compiled nothing.
    monkeypatch.setattr(ca, "_lib", ca._UNSET)
    monkeypatch.setattr(ca, "__file__", str(tmp_path / "cpu_adam.py"))
    monkeypatch.delenv(ca.ENV_ISA, raising=False)
    assert not ca.native_available() and ca.available_isas() == () and not ca.has_openmp()
    assert ca.selected_isa() == "torch"
    from memopt._utils.native import native_status

    assert native_status()["_cpu_adam_lib"].startswith("not built")
    p0, grads = _state(1001, seed=8)
    torch.testing.assert_close(
        _run(p0, grads, "torch").double(), _reference(p0, grads, "torch"), atol=2e-6, rtol=1e-5
    )
    monkeypatch.setattr(ca, "_lib", ca._UNSET)  # the next test loads the real library again


def test_stale_library_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_native()
    monkeypatch.setattr(ca, "_lib", ca._UNSET)
    monkeypatch.setattr(ca, "_ABI", 999)
    with pytest.warns(UserWarning, match="stale build"):
        assert not ca.native_available()
    monkeypatch.setattr(ca, "_lib", ca._UNSET)


def test_bad_arguments_are_value_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    p, g, m, v = (torch.zeros(8) for _ in range(4))
    bad = {
        "eps_mode": dict(eps_mode="adam"),
        "step": dict(step=0),
        "expected one of": dict(out_lowp=torch.zeros(8, dtype=torch.float64)),
        "with 8": dict(out_lowp=torch.zeros(9, dtype=torch.bfloat16)),
    }
    for match, kw in bad.items():
        args = {"step": 1, "lr": 1e-3, **kw}
        with pytest.raises(ValueError, match=match):
            ca.cpu_adamw_step_(p, g, m, v, **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contiguous"):
        ca.cpu_adamw_step_(torch.zeros(4, 2).t(), torch.zeros(2, 4), m, v, step=1, lr=1.0)
    with pytest.raises(ValueError, match="1 params but 2 grads"):
        ca.cpu_adamw_step_(p, [g, g], m, v, step=1, lr=1.0)
    with pytest.raises(ValueError, match="expected one of"):
        ca.cpu_adamw_step_(p.double(), g, m, v, step=1, lr=1.0)
    monkeypatch.setenv(ca.ENV_ISA, "sse9")
    with pytest.raises(ValueError, match="choose one of"):
        ca.selected_isa()
    missing = [x for x in ca.ISAS if x not in NATIVE_ISAS]
    if ca.native_available() and missing:
        monkeypatch.setenv(ca.ENV_ISA, missing[0])
        with pytest.raises(ValueError, match="supports only"):
            ca.selected_isa()
