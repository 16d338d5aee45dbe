"""``matmul_dtype="bfloat16"``: the projection GEMMs in bf16, everything else unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch

from memopt.offload import cpu_lowrank
from memopt.optim import ApolloAdamW, FrugalAdamW, GaLoreAdamW, NaturalGaLoreAdamW, kernels
from memopt.optim.projection import dense

SHAPES = [(24, 40), (40, 24), (32, 32)]


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


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_galore_projection_and_update_are_the_bf16_gemms(proj_type: str) -> None:
    """The projected gradient and the write into W are exactly the bf16 GEMMs, in fp32."""
    ps, opt = _train(GaLoreAdamW, {"rank": 4, "update_proj_gap": 50, "proj_type": proj_type,
                                   "matmul_dtype": "bfloat16"}, steps=1)
    group = opt.param_groups[0]
    proj = opt.projector(group)
    for p in ps:
        state = opt.state[p]
        P, Q = proj.basis(state)
        assert P.dtype == torch.float32  # the stored basis keeps its dtype
        grad = torch.randn(p.shape)
        low = proj.project(state, grad)
        b, pb = grad.bfloat16(), P.bfloat16()
        side = proj.side(tuple(p.shape))
        if side == "right":
            want = b @ pb.T
        elif side == "left":
            want = pb.T @ b
        else:
            want = pb.T @ b @ Q.bfloat16().T
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, want.float(), rtol=0, atol=0)

        direction = torch.randn_like(low)
        w = p.detach().clone()
        before = w.clone()
        proj.apply_update(state, direction, w, alpha=-0.5, beta=0.9)
        back = proj.project_back(state, direction)
        assert back.dtype == torch.bfloat16
        # one rounding (native fused kernel) or two (torch): equal to fp32 rounding
        torch.testing.assert_close(w, before * 0.9 - 0.5 * back.float(), rtol=1e-6, atol=1e-6)


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
def test_bf16_matmuls_track_fp32(cls, group: dict, bound: float) -> None:
    """Across refreshes, the weights stay within bf16 rounding of the fp32-matmul run
    (relative to how far they moved), and differ from it (the option is applied)."""
    ref, _ = _train(cls, group)
    got, _ = _train(cls, {**group, "matmul_dtype": "bfloat16"})
    start = _params()
    for a, b, s in zip(ref, got, start, strict=True):
        moved = (a - s).norm()
        assert moved > 0
        err = ((b - a).norm() / moved).item()
        assert 0 < err < bound, err


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


def test_warns_where_the_cpu_has_no_bf16_dot_products(monkeypatch) -> None:
    monkeypatch.setattr(dense, "cpu_has_bf16_gemm", lambda: False)
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


@pytest.mark.parametrize("n", [0, 7, 1 << 17])
def test_add_lowp_matches_torch(n: int, monkeypatch) -> None:
    """The native one-pass bf16 -> fp32 axpby equals torch's mixed-dtype add (to fp32
    rounding), with MEMOPT_KERNELS=torch as the reference and strided tensors falling back."""
    g = torch.Generator().manual_seed(n)
    out = torch.randn(n, generator=g)
    upd = torch.randn(n, generator=g).bfloat16()
    want = out * 0.75 + (-0.3) * upd.float()
    got = out.clone()
    kernels.add_lowp_(got, upd, alpha=-0.3, beta=0.75)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if n and cpu_lowrank.usable(out):  # the native path really ran (not the fallback)
        assert cpu_lowrank.axpby_bf16(out.clone(), upd, alpha=1.0)
    strided = torch.randn(2 * n + 2, generator=g)[::2][:n] if n else out.clone()
    assert not n or not cpu_lowrank.axpby_bf16(strided, upd, alpha=1.0)
    ref = strided.clone()
    kernels.add_lowp_(strided, upd, alpha=2.0)
    torch.testing.assert_close(strided, ref + 2.0 * upd.float(), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("MEMOPT_KERNELS", "torch")
    forced = out.clone()
    kernels.add_lowp_(forced, upd, alpha=-0.3, beta=0.75)
    torch.testing.assert_close(forced, want, rtol=1e-6, atol=1e-6)
