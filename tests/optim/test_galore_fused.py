"""GaLore's steady step without bookkeeping (``memopt.optim._galore_fused``): taken exactly
where it applies, on both routes (``native``: the one native call of ``matmul_dtype=
"bfloat16"`` on AMX; ``torch``: fp32 GEMMs and the native Adam pass called directly), and
bitwise the same as the general path (refreshes, weight decay, bias correction, the moments
policies, staggering, optimizer-in-backward, resume).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from memopt.offload import cpu_gemm
from memopt.offload.cpu_adam import native_available
from memopt.optim import GaLoreAdamW, NaturalGaLoreAdamW, galore, step_in_backward

pytestmark = pytest.mark.skipif(not native_available(), reason="native library not built")
AMX = pytest.mark.skipif(not cpu_gemm.available(), reason="no AMX-BF16 on this CPU")
ROUTES = [pytest.param("native", marks=AMX), "torch"]
MATMUL = {"native": "bfloat16", "torch": None}

SHAPES = [(96, 64), (64, 200), (64, 64)]
STEPS, GAP = 12, 5


@pytest.fixture
def calls(monkeypatch):
    """The route of every step that took the fused path."""
    seen = []
    real = galore.fused_step

    def counting(opt, p, group, route):
        ran = real(opt, p, group, route)
        if ran:
            seen.append(route)
        return ran

    monkeypatch.setattr(galore, "fused_step", counting)
    return seen


def _run(fused_on, route="native", cls=GaLoreAdamW, steps=STEPS, **group):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    opts = {"rank": 16, "update_proj_gap": GAP, "matmul_dtype": MATMUL[route], **group}
    opt = cls([{"params": ps, **opts}], lr=1e-2)
    opt.fused_steady_step = fused_on and cls.fused_steady_step
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, opt


def _same(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
        for key, val in oa.state[x].items():
            other = ob.state[y][key]
            assert torch.equal(val, other) if torch.is_tensor(val) else val == other, key


CASES = [
    {},
    {"proj": "svd", "weight_decay": 0.1},
    {"proj": "rsvd", "proj_type": "reverse_std"},
    {"proj": "subspace", "proj_type": "left"},
    {"proj": "gram", "proj_type": "right", "scale": 0.5},
    {"moments": "reset"},
    {"moments": "rotate", "stagger": True},
    {"correct_bias": False, "betas": (0.8, 0.95), "eps": 1e-4},
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("group", CASES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
def test_fused_steps_equal_the_step_by_step_path(group, route, calls) -> None:
    got = _run(True, route, **group)
    # steady steps: every step but the refreshes (step 0, then step % GAP == the phase,
    # which staggering spreads as i * GAP // n)
    n = len(SHAPES)
    phases = [i * GAP // n if group.get("stagger") else 0 for i in range(n)]
    refreshes = sum(s == 0 or s % GAP == ph for ph in phases for s in range(STEPS))
    assert calls == [route] * (n * STEPS - refreshes)
    calls.clear()
    _same(got, _run(False, route, **group))
    assert not calls


@pytest.mark.parametrize(
    "route,cls,group,env",
    [
        ("torch", NaturalGaLoreAdamW, {}, {}),  # another update rule
        ("torch", GaLoreAdamW, {"state_dtype": "int8"}, {}),  # quantized moments
        ("torch", GaLoreAdamW, {"proj_type": "full"}, {}),  # two-sided
        ("torch", GaLoreAdamW, {"proj": "random"}, {}),  # seeded basis, no proj_P
        ("torch", GaLoreAdamW, {}, {"MEMOPT_KERNELS": "torch"}),  # the torch reference forced
        pytest.param("native", NaturalGaLoreAdamW, {}, {}, marks=AMX),
        pytest.param("native", GaLoreAdamW, {"state_dtype": "int8"}, {}, marks=AMX),
        pytest.param("native", GaLoreAdamW, {}, {"MEMOPT_KERNELS": "torch"}, marks=AMX),
        # oneDNN forced: neither the native call nor the fp32 route's arithmetic
        pytest.param("native", GaLoreAdamW, {}, {"MEMOPT_MATMUL_ROUTE": "fpmath"}, marks=AMX),
    ],
)
def test_other_paths_are_not_fused(route, cls, group, env, calls, monkeypatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _run(True, route, cls=cls, **group)
    assert not calls


@pytest.mark.parametrize("matmul_dtype", [pytest.param("bfloat16", marks=AMX), None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_are_not_fused(dtype, matmul_dtype, calls) -> None:
    p = nn.Parameter(torch.randn(64, 48, dtype=dtype))
    opt = GaLoreAdamW([{"params": [p], "rank": 8, "matmul_dtype": matmul_dtype}])
    for _ in range(3):
        p.grad = torch.randn(64, 48, dtype=dtype)
        opt.step()
    assert not calls


@pytest.mark.parametrize("route", ROUTES)
def test_in_backward_takes_it_and_matches(route, calls) -> None:
    def train(fused_on):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(48, 64, bias=False), nn.Tanh(), nn.Linear(64, 8))
        mats = [model[0].weight, model[2].weight]
        opt = GaLoreAdamW(
            [
                {"params": mats, "rank": 4, "update_proj_gap": 4, "matmul_dtype": MATMUL[route]},
                {"params": [model[2].bias]},
            ],
            lr=1e-2,
        )
        opt.fused_steady_step = fused_on
        handle = step_in_backward(model, opt, max_grad_norm=1.0)
        gen = torch.Generator().manual_seed(2)
        for _ in range(9):
            x, y = torch.randn(16, 48, generator=gen), torch.randn(16, 8, generator=gen)
            (model(x) - y).square().mean().backward()
        handle.remove()
        return [p.detach().clone() for p in model.parameters()]

    got = train(True)
    assert calls == [route] * (2 * (9 - 3))  # refreshes at steps 0, 4, 8
    for a, b in zip(got, train(False), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("route", ROUTES)
def test_resume_continues_bit_for_bit(route, calls) -> None:
    ps, opt = _run(True, route, steps=7)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    weights = [p.detach().clone() for p in ps]
    fresh = [nn.Parameter(w.clone()) for w in weights]
    opt2 = GaLoreAdamW(
        [{"params": fresh, "rank": 16, "update_proj_gap": GAP, "matmul_dtype": MATMUL[route]}],
        lr=1e-2,
    )
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    gen = torch.Generator().manual_seed(9)
    grads = [[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(4)]
    for o, params in ((opt, ps), (opt2, fresh)):
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ps, fresh, strict=True):
        assert torch.equal(a, b)
    assert calls and set(calls) == {route}
