"""The native AdamW step on int8 moments (``memopt.offload.cpu_lowbit``) against the eager
torch path (``MEMOPT_KERNELS=torch``: dequantize, ``torch._fused_adamw_``, quantize).

The kernel is written to round exactly as the torch path does, so every comparison here is
bit for bit: parameters, both code arrays and both absmax arrays."""

from __future__ import annotations

import pytest
import torch

from memopt.offload import cpu_lowbit
from memopt.offload.cpu_adam import native_available
from memopt.optim import AdamW, GaLoreAdamW, _full_adam
from memopt.optim.kernels import lowbit_adam
from tests.optim._roundtrip import reload

pytestmark = pytest.mark.skipif(not native_available(), reason="native library not built")

QKEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


@pytest.fixture(params=[True, False], ids=["vector-search", "table-search"])
def calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the native kernel's calls; runs each test with either code search (the
    AVX-512 register search where the CPU has it, and the lookup tables)."""
    seen: list[int] = []
    real = cpu_lowbit.adamw_q8

    def counted(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append(1)
        return real(*args, **kw, vector_search=request.param)

    monkeypatch.setattr(cpu_lowbit, "adamw_q8", counted)
    return seen


def _steps(
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    eps_mode: str,
    wd: float,
    steps: int = 4,
    betas: tuple[float, float] = (0.9, 0.999),
    grads: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """``steps`` AdamW steps through ``_full_adam.adamw_many`` on int8 moments."""
    monkeypatch.setenv("MEMOPT_KERNELS", mode)
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    with torch.no_grad():
        p.view(-1)[256:512] = 0.0  # the second quantization block: all zeros throughout
    group = {"lr": 1e-2, "betas": betas, "eps": 1e-8, "weight_decay": wd, "state_dtype": "int8"}
    st: dict = {"step": 0}
    for s in range(steps):
        g = torch.randn(shape, generator=gen) if grads is None else grads[s]
        g = g.clone()
        g.view(-1)[256:512] = 0.0
        p.grad = g.to(dtype)
        with torch.no_grad():
            _full_adam.adamw_many([p], [st], group, eps_mode)  # type: ignore[arg-type]
    return p.detach(), st


def _assert_same(got: tuple[torch.Tensor, dict], ref: tuple[torch.Tensor, dict]) -> None:
    assert torch.equal(got[0], ref[0]), (got[0] != ref[0]).sum()
    for key in QKEYS:
        assert torch.equal(got[1][key], ref[1][key]), key


@pytest.mark.parametrize("shape", [(61, 300), (4096 + 17,)])  # not multiples of 256
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("eps_mode", ["torch", "galore"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_path(shape, wd, eps_mode, dtype, monkeypatch, calls) -> None:  # type: ignore[no-untyped-def]
    kw = dict(shape=shape, dtype=dtype, eps_mode=eps_mode, wd=wd)
    ref = _steps("torch", monkeypatch, **kw)
    assert not calls
    got = _steps("auto", monkeypatch, **kw)
    assert len(calls) == 4  # every step, the first (no codes yet) included
    _assert_same(got, ref)
    zero = got[1]
    assert float(zero["exp_avg_absmax"][1]) == 0.0 and float(zero["exp_avg_sq_absmax"][1]) == 0.0


def test_lerp_from_g(monkeypatch, calls) -> None:  # type: ignore[no-untyped-def]
    """1 - beta1 >= 0.5: torch's lerp computes from the end point g."""
    kw = dict(shape=(40, 200), dtype=torch.float32, eps_mode="torch", wd=0.1, betas=(0.3, 0.9))
    _assert_same(_steps("auto", monkeypatch, **kw), _steps("torch", monkeypatch, **kw))
    assert len(calls) == 4


def test_ties_go_to_the_lower_code(monkeypatch, calls) -> None:  # type: ignore[no-untyped-def]
    """Moments exactly on a code midpoint and one ulp either side (beta1 = 0: m = g).

    Each block of the gradient starts with +-1, its absmax, so y = g exactly."""
    mids = lowbit_adam.midpoints(True)
    vals = torch.cat([mids, mids.nextafter(mids.new_tensor(2.0)), mids.nextafter(-mids - 2)])
    blocks = vals.view(-1, 255).repeat(6, 1)
    sign = torch.where(torch.arange(blocks.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
    g = torch.cat([sign, blocks], dim=1).reshape(-1)
    g[256:512] = 0.0  # _steps zeroes this block anyway
    kw = dict(shape=tuple(g.shape), dtype=torch.float32, eps_mode="torch", wd=0.0, steps=1,
              betas=(0.0, 0.5), grads=[g])  # fmt: skip
    _assert_same(_steps("auto", monkeypatch, **kw), _steps("torch", monkeypatch, **kw))
    assert len(calls) == 1


def test_forced_torch_takes_the_torch_path(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def refuse(*args, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("the native kernel ran under MEMOPT_KERNELS=torch")

    monkeypatch.setattr(cpu_lowbit, "adamw_q8", refuse)
    p, st = _steps("torch", monkeypatch, shape=(4096,), dtype=torch.float32, eps_mode="torch",
                   wd=0.0, steps=2)  # fmt: skip
    assert st["exp_avg_q"].dtype == torch.uint8 and torch.isfinite(p).all()
    with pytest.raises(AssertionError, match="native kernel ran"):
        _steps("auto", monkeypatch, shape=(4096,), dtype=torch.float32, eps_mode="torch",
               wd=0.0, steps=1)  # fmt: skip


def test_only_where_it_applies(monkeypatch, calls) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMOPT_KERNELS", "auto")
    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    p = torch.nn.Parameter(torch.randn(64, 128))
    p.grad = torch.randn(128, 64).t()  # not contiguous: the torch path
    for kind in ("int8", "int4"):
        st: dict = {"step": 0}
        with torch.no_grad():
            _full_adam.adamw_many([p], [st], {**group, "state_dtype": kind}, "torch")
        assert "exp_avg_q" in st
    assert not calls
    p.grad = p.grad.contiguous()
    st = {"step": 0}
    with torch.no_grad():
        _full_adam.adamw_many([p], [st], {**group, "state_dtype": "int8"}, "torch")
    assert len(calls) == 1


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s) * 0.1) for s in ((96, 130), (5000,))]


def _make(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "adamw":
        return AdamW(params, lr=1e-2, weight_decay=0.1, state_dtype="int8")
    # GaLoreAdamW's full-state group: the galore eps form
    return GaLoreAdamW([{"params": params}], lr=1e-2, weight_decay=0.1, state_dtype="int8")


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], start: int, n: int) -> None:
    for s in range(start, start + n):
        gen = torch.Generator().manual_seed(s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_optimizer_and_resume(name, monkeypatch, calls) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMOPT_KERNELS", "torch")
    ref = _params()
    ref_opt = _make(name, ref)
    _run(ref_opt, ref, 0, 6)
    assert not calls

    monkeypatch.setenv("MEMOPT_KERNELS", "auto")
    params = _params()
    opt = _make(name, params)
    _run(opt, params, 0, 3)
    params2, opt2 = reload(params, opt, lambda ps: _make(name, ps))
    _run(opt2, params2, 3, 3)
    assert len(calls) == 2 * 6  # resumed state still goes through the native kernel
    for a, b in zip(ref, params2, strict=True):
        assert torch.equal(a, b)
        for key in QKEYS:
            assert torch.equal(ref_opt.state[a][key], opt2.state[b][key]), key
