"""GaLore's one-call steady step (``memopt.optim._galore_fused``): taken exactly where it
applies, and bitwise the same as the step-by-step path (refreshes, weight decay, bias
correction, the moments policies, staggering, optimizer-in-backward, resume).

Runs only where the CPU has AMX-BF16 and the native library is built (the fused path is the
``matmul_dtype="bfloat16"`` native route).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from memopt.offload import cpu_gemm
from memopt.optim import GaLoreAdamW, NaturalGaLoreAdamW, step_in_backward
from memopt.optim import _galore_fused as fused

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(), reason="no AMX-BF16 on this CPU, or the native library not built"
)

SHAPES = [(96, 64), (64, 200), (64, 64)]
STEPS, GAP = 12, 5


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused native calls."""
    seen = []
    real = cpu_gemm.projected_adam_

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused.cpu_gemm, "projected_adam_", counting)
    return seen


def _run(fused_on, cls=GaLoreAdamW, steps=STEPS, **group):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    opts = {"rank": 16, "update_proj_gap": GAP, "matmul_dtype": "bfloat16", **group}
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


@pytest.mark.parametrize("group", CASES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
def test_fused_steps_equal_the_step_by_step_path(group, calls) -> None:
    got = _run(True, **group)
    # steady steps: every step but the refreshes (step 0, then step % GAP == the phase,
    # which staggering spreads as i * GAP // n)
    n = len(SHAPES)
    phases = [i * GAP // n if group.get("stagger") else 0 for i in range(n)]
    refreshes = sum(s == 0 or s % GAP == ph for ph in phases for s in range(STEPS))
    assert len(calls) == n * STEPS - refreshes
    calls.clear()
    _same(got, _run(False, **group))
    assert not calls


@pytest.mark.parametrize(
    "cls,group,env",
    [
        (NaturalGaLoreAdamW, {}, {}),  # another update rule
        (GaLoreAdamW, {"matmul_dtype": None}, {}),  # fp32 GEMMs
        (GaLoreAdamW, {"state_dtype": "int8"}, {}),  # quantized moments
        (GaLoreAdamW, {"proj_type": "full"}, {}),  # two-sided
        (GaLoreAdamW, {"proj": "random"}, {}),  # seeded basis, no proj_P
        (GaLoreAdamW, {}, {"MEMOPT_KERNELS": "torch"}),  # the torch reference forced
        (GaLoreAdamW, {}, {"MEMOPT_MATMUL_ROUTE": "fpmath"}),  # oneDNN forced
    ],
)
def test_other_paths_are_not_fused(cls, group, env, calls, monkeypatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _run(True, cls=cls, **group)
    assert not calls


def test_a_bf16_parameter_is_not_fused(calls) -> None:
    p = nn.Parameter(torch.randn(64, 48).bfloat16())
    opt = GaLoreAdamW([{"params": [p], "rank": 8, "matmul_dtype": "bfloat16"}])
    for _ in range(3):
        p.grad = torch.randn(64, 48).bfloat16()
        opt.step()
    assert not calls


def test_in_backward_takes_it_and_matches(calls) -> None:
    def train(fused_on):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(48, 64, bias=False), nn.Tanh(), nn.Linear(64, 8))
        mats = [model[0].weight, model[2].weight]
        opt = GaLoreAdamW(
            [
                {"params": mats, "rank": 4, "update_proj_gap": 4, "matmul_dtype": "bfloat16"},
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
    assert len(calls) == 2 * (9 - 3)  # refreshes at steps 0, 4, 8
    for a, b in zip(got, train(False), strict=True):
        assert torch.equal(a, b)


def test_resume_continues_bit_for_bit(calls) -> None:
    ps, opt = _run(True, steps=7)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    weights = [p.detach().clone() for p in ps]
    fresh = [nn.Parameter(w.clone()) for w in weights]
    opt2 = GaLoreAdamW(
        [{"params": fresh, "rank": 16, "update_proj_gap": GAP, "matmul_dtype": "bfloat16"}],
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
    assert len(calls) > 0
