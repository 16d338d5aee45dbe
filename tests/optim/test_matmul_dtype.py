"""``matmul_dtype="bfloat16"``: the projection GEMMs in bf16 arithmetic, the rest unchanged.

Three routes (``memopt.optim.projection.lowp``): on an AMX CPU, memopt's own bf16 GEMM
("native"); on other CPUs, fp32 GEMMs under oneDNN's bf16 math mode ("fpmath"); elsewhere,
GEMMs on bf16 copies ("cast"). All are run here on the CPU, the later ones by turning the
earlier ones off (the native one only where the CPU has AMX).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from memopt.offload import cpu_gemm
from memopt.optim import ApolloAdamW, FrugalAdamW, GaLoreAdamW, NaturalGaLoreAdamW, kernels
from memopt.optim.projection import lowp

SHAPES = [(24, 40), (40, 24), (32, 32)]
needs_fpmath = pytest.mark.skipif(not lowp.fpmath_available(), reason="torch without the knob")


@pytest.fixture(params=["native", "fpmath", "cast"])
def route(request, monkeypatch) -> str:
    if request.param == "native" and not cpu_gemm.available():
        pytest.skip("no AMX-BF16 on this CPU, or the native library is not built")
    if request.param == "fpmath" and not lowp.fpmath_available():
        pytest.skip("this torch has no oneDNN fp32-precision knob")
    if request.param != "native":
        monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    if request.param == "cast":
        monkeypatch.setattr(lowp, "fpmath_available", lambda: False)
        monkeypatch.setattr(lowp, "cpu_has_bf16_gemm", lambda: True)  # no warning here
    return request.param


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _train(cls, group: dict, steps: int = 6, dtype=torch.float32, **ctor):
    ps = _params()
    for p in ps:
        p.data = p.data.to(dtype)
    opt = cls([{"params": ps, **group}], lr=1e-2, **ctor)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return ps, opt


def proj_ref(g, pp, qq, side):
    if side == "right":
        return g @ pp.T
    if side == "left":
        return pp.T @ g
    return pp.T @ g @ qq.T


def back_ref(d, pp, qq, side):
    if qq is not None:
        return pp @ d @ qq
    return d @ pp if side == "right" else pp @ d


def test_routes() -> None:
    x = torch.zeros(2, 2)
    assert lowp.route(x, None) is None
    assert lowp.route(x.bfloat16(), "bfloat16") is None  # already bf16 GEMMs
    assert lowp.route(x.half(), "bfloat16") is None  # would lose mantissa bits
    want = "native" if cpu_gemm.available() else "fpmath" if lowp.fpmath_available() else "cast"
    assert lowp.route(x, "bfloat16") == want


def test_route_can_be_forced(monkeypatch) -> None:
    monkeypatch.setattr(lowp, "cpu_has_bf16_gemm", lambda: True)
    x = torch.zeros(2, 2)
    monkeypatch.setenv("MEMOPT_MATMUL_ROUTE", "cast")
    assert lowp.route(x, "bfloat16") == "cast"
    if lowp.fpmath_available():
        monkeypatch.setenv("MEMOPT_MATMUL_ROUTE", "fpmath")
        assert lowp.route(x, "bfloat16") == "fpmath"
    monkeypatch.setenv("MEMOPT_MATMUL_ROUTE", "native")
    monkeypatch.setattr("memopt._utils.logging._SEEN", set())
    if cpu_gemm.available():
        assert lowp.route(x, "bfloat16") == "native"
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    with pytest.warns(UserWarning, match="AMX bf16 GEMM is not usable here"):
        assert lowp.route(x, "bfloat16") in ("fpmath", "cast")  # the next route, said so
    monkeypatch.setenv("MEMOPT_MATMUL_ROUTE", "fast")
    with pytest.raises(ValueError, match="MEMOPT_MATMUL_ROUTE must be one of auto, native"):
        lowp.route(x, "bfloat16")


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_projection_and_update_arithmetic(proj_type: str, route: str) -> None:
    """On the cast route the projected gradient and the write into W are exactly the bf16
    GEMMs, in fp32; on the fpmath route they are fp32 GEMMs within bf16 rounding."""
    ps, opt = _train(GaLoreAdamW, {"rank": 4, "update_proj_gap": 50, "proj_type": proj_type,
                                   "matmul_dtype": "bfloat16"}, steps=1)
    proj = opt.projector(opt.param_groups[0])
    for p in ps:
        state = opt.state[p]
        P, Q = proj.basis(state)
        assert P.dtype == torch.float32  # the stored basis keeps its dtype
        grad = torch.randn(p.shape)
        side = proj.side(tuple(p.shape))
        low = proj.project(state, grad)
        direction = torch.randn_like(low)
        w = p.detach().clone()
        before = w.clone()
        proj.apply_update(state, direction, w, alpha=-0.5, beta=0.9)
        assert low.dtype == w.dtype == torch.float32

        if route == "cast":
            bf = torch.bfloat16
            qb = None if Q is None else Q.to(bf)
            assert torch.equal(low, proj_ref(grad.to(bf), P.to(bf), qb, side).float())
            back = back_ref(direction.to(bf), P.to(bf), qb, side)
            assert torch.equal(proj.project_back(state, direction), back)
            torch.testing.assert_close(w, before * 0.9 - 0.5 * back.float())
        elif route == "native":  # fp32 sums of the bf16-rounded operands' products
            def bd(t):
                return None if t is None else t.bfloat16().double()

            exact = proj_ref(bd(grad), bd(P), bd(Q), side)
            if Q is not None:  # the inner product is rounded to bf16 again for the outer GEMM
                exact = proj_ref(bd(grad), bd(P), None, "left").float().bfloat16().double()
                exact = exact @ bd(Q).T
            torch.testing.assert_close(low.double(), exact, rtol=1e-5, atol=1e-5)
            d = bd(direction)
            if Q is not None:
                d = (direction.bfloat16().double() @ bd(Q)).float().bfloat16().double()
                upd = bd(P) @ d
            else:
                upd = back_ref(d, bd(P), None, side)
            torch.testing.assert_close(w.double(), before.double() * 0.9 - 0.5 * upd,
                                       rtol=1e-5, atol=1e-5)
        else:
            exact = proj_ref(grad.double(), P.double(), None if Q is None else Q.double(), side)
            assert ((low.double() - exact).norm() / exact.norm()) < 2**-8
            upd = back_ref(direction.double(), P.double(), None if Q is None else Q.double(), side)
            err = (w.double() - (before.double() * 0.9 - 0.5 * upd)).norm()
            assert err / (0.5 * upd.norm()) < 2**-8


@needs_fpmath
def test_fpmath_knob_is_set_only_around_the_gemms(monkeypatch) -> None:
    """The oneDNN knob reads "bf16" inside memopt's GEMMs and is restored after (also when
    a GEMM raises); the user's own matmuls are untouched."""
    knob = torch.backends.mkldnn.matmul
    seen: list[str] = []
    real_project = lowp.cpu_bf16_fpmath

    def spy():
        cm = real_project()

        class Wrap:
            def __enter__(self):
                cm.__enter__()
                seen.append(knob.fp32_precision)

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrap()

    monkeypatch.setattr(lowp, "cpu_bf16_fpmath", spy)
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)  # the fpmath route
    before = knob.fp32_precision
    _train(GaLoreAdamW, {"rank": 4, "update_proj_gap": 3, "matmul_dtype": "bfloat16"}, steps=2)
    assert seen and set(seen) == {"bf16"}
    assert knob.fp32_precision == before
    monkeypatch.setattr(lowp, "cpu_bf16_fpmath", real_project)
    with pytest.raises(RuntimeError), lowp.cpu_bf16_fpmath():
        torch.ones(2, 3) @ torch.ones(2, 3)  # shape error inside
    assert knob.fp32_precision == before


@pytest.mark.parametrize(
    "cls,group,bound",
    [
        (GaLoreAdamW, {"rank": 4, "update_proj_gap": 3, "proj": "rsvd"}, 0.01),
        (GaLoreAdamW, {"rank": 4, "update_proj_gap": 3, "proj": "subspace"}, 0.01),
        (ApolloAdamW, {"rank": 4, "update_proj_gap": 3}, 0.01),
        # the Woodbury solve amplifies the rounding (docs/optim.md, Natural GaLore)
        (NaturalGaLoreAdamW, {"rank": 4, "update_proj_gap": 3}, 0.03),
        # signSGD on the residual G - P P^T G: entries near zero flip sign
        (FrugalAdamW, {"density": 0.25, "update_proj_gap": 3}, 0.1),
    ],
    ids=["galore-rsvd", "galore-subspace", "apollo", "natural-galore", "frugal-svd"],
)
def test_bf16_matmuls_track_fp32(cls, group: dict, bound: float, route: str) -> None:
    """Across refreshes, the weights stay within bf16 rounding of the fp32-matmul run,
    relative to how far they moved."""
    ref, _ = _train(cls, group)
    got, _ = _train(cls, {**group, "matmul_dtype": "bfloat16"})
    start = _params()
    for a, b, s in zip(ref, got, start, strict=True):
        moved = (a - s).norm()
        assert moved > 0
        err = ((b - a).norm() / moved).item()
        assert err < bound, err
        if route == "cast":
            assert err > 0  # the option really changed the arithmetic


def test_bf16_parameters_are_unaffected() -> None:
    """With bf16 parameters the GEMMs already run in bf16: the option changes nothing."""
    group = {"rank": 4, "update_proj_gap": 3}
    ref, _ = _train(GaLoreAdamW, group, dtype=torch.bfloat16)
    got, _ = _train(GaLoreAdamW, {**group, "matmul_dtype": "bfloat16"}, dtype=torch.bfloat16)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_bad_values_are_errors() -> None:
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="matmul_dtype must be None .* got 'float16'"):
        GaLoreAdamW([{"params": [p], "rank": 2, "matmul_dtype": "float16"}])
    with pytest.raises(ValueError, match="proj='columns' has none"):
        FrugalAdamW([{"params": [p], "density": 0.25, "proj": "columns",
                      "matmul_dtype": "bfloat16"}])
    with pytest.raises(ValueError, match="proj='block' has none"):
        FrugalAdamW([{"params": [p], "density": 0.25, "proj": "block",
                      "matmul_dtype": "bfloat16"}])


def test_cast_route_warns_where_the_cpu_has_no_bf16_dot_products(monkeypatch) -> None:
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    monkeypatch.setattr(lowp, "fpmath_available", lambda: False)
    monkeypatch.setattr(lowp, "cpu_has_bf16_gemm", lambda: False)
    monkeypatch.setattr("memopt._utils.logging._SEEN", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(GaLoreAdamW, {"rank": 4, "update_proj_gap": 3, "matmul_dtype": "bfloat16"},
               steps=1)
    assert any("no native bf16 dot products" in str(w.message) for w in caught)


def test_config_key_reaches_the_groups() -> None:
    import memopt
    from memopt.config.build import build_optimizer

    model = torch.nn.Sequential()
    model.add_module("attn", torch.nn.Linear(16, 16))
    cfg = memopt.Config.from_dict(
        {"optimizer": {"name": "galore", "rank": 4, "matmul_dtype": "bfloat16"}})
    opt = build_optimizer(model, cfg.optimizer)
    low = [g for g in opt.param_groups if g.get("rank")]
    assert low and all(g["matmul_dtype"] == "bfloat16" for g in low)


def test_fast_env_reads_follow_the_environment(monkeypatch) -> None:
    """The hot-path reads of MEMOPT_MATMUL_ROUTE / MEMOPT_KERNELS see every way of setting them."""
    from memopt._utils.env import getenv_fast

    name = "MEMOPT_TEST_FAST_ENV"
    monkeypatch.delenv(name, raising=False)
    assert getenv_fast(name, "dflt") == "dflt"
    monkeypatch.setenv(name, "one")
    assert getenv_fast(name, "dflt") == "one"
    os.environ[name] = "two"
    assert getenv_fast(name, "dflt") == "two"
    del os.environ[name]
    assert getenv_fast(name, "dflt") == "dflt"
    monkeypatch.setenv("MEMOPT_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MEMOPT_KERNELS must be auto, torch or triton"):
        kernels.backend(torch.zeros(1))


def test_fpmath_context_keeps_a_global_bf16_setting() -> None:
    knob = torch.backends.mkldnn.matmul
    if not lowp.fpmath_available():
        pytest.skip("this torch has no oneDNN fp32-precision knob")
    before = knob.fp32_precision
    try:
        knob.fp32_precision = "bf16"  # the user's own global choice
        with lowp.cpu_bf16_fpmath():
            assert knob.fp32_precision == "bf16"
        assert knob.fp32_precision == "bf16"
    finally:
        knob.fp32_precision = before


def test_native_route_falls_back_for_operands_it_does_not_take(monkeypatch) -> None:
    """A write-back into a parameter without unit column stride, on the native route, runs
    as a torch GEMM (oneDNN's bf16 math where the knob exists, plain fp32 where it does not)
    and gives the same update within bf16 rounding."""
    if not cpu_gemm.available():
        pytest.skip("no AMX-BF16 on this CPU, or the native library is not built")
    g = torch.Generator().manual_seed(3)
    p, low = torch.randn(24, 8, generator=g), torch.randn(8, 40, generator=g)
    exact = p.double() @ low.double()
    for knob in (True, False):
        monkeypatch.setattr(lowp, "fpmath_available", lambda knob=knob: knob)
        out = torch.zeros(40, 24).T  # 24 x 40, column stride 24
        lowp.addmm_("native", out, p, low, alpha=1.0, beta=0.0)
        assert ((out.double() - exact).norm() / exact.norm()) < 2**-8
