"""Triton kernels against the torch path: on CPU under TRITON_INTERPRET=1, or compiled on a GPU.

Run by test_triton_kernels.py in a subprocess, because Triton decides at import time
whether kernels are interpreted; ``tests/gpu`` calls the same checks with ``dev="cuda"``.
Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

from memopt.optim import ApolloAdamW, ApolloMini, FrugalAdamW, GaLoreAdamW, kernels  # noqa: E402


def _with_backend(name, fn):
    os.environ["MEMOPT_KERNELS"] = name
    try:
        return fn()
    finally:
        os.environ.pop("MEMOPT_KERNELS", None)


def check_adam_update(dev: str = "cpu") -> None:
    for shape in [(33, 17), (5, 300)]:
        for norms_dim in (None, 0, 1):
            for eps_mode in ("galore", "torch"):
                torch.manual_seed(0)
                low = torch.randn(shape).to(dev)
                m0, v0 = torch.randn(shape).to(dev), torch.rand(shape).to(dev)

                def run(m0=m0, v0=v0, low=low, norms_dim=norms_dim, eps_mode=eps_mode):
                    m, v = m0.clone(), v0.clone()
                    out = kernels.adam_update(
                        low,
                        m,
                        v,
                        step=3,
                        beta1=0.9,
                        beta2=0.99,
                        eps=1e-6,
                        lr=0.1,
                        eps_mode=eps_mode,
                        norms_dim=norms_dim,
                    )
                    return m, v, out

                mt, vt, (dt, st, nt, et) = _with_backend("torch", run)
                mk, vk, (dk, sk, nk, ek) = _with_backend("triton", run)
                for a, b in [(mt, mk), (vt, vk), (dt, dk)]:
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
                assert st == sk
                if norms_dim is not None:
                    torch.testing.assert_close(nk, nt, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(ek, et, rtol=1e-5, atol=1e-5)


def check_scaled_update(dev: str = "cpu") -> None:
    torch.manual_seed(0)
    w0, g = torch.randn(7, 300).to(dev), torch.randn(7, 300).to(dev)
    for f in (torch.tensor(0.7), torch.rand(7, 1), torch.rand(1, 300)):
        factor = f.to(dev)

        def run(factor=factor):
            w = w0.clone()
            kernels.scaled_update_(w, g, factor, alpha=-0.3, keep=0.99)
            return w

        torch.testing.assert_close(
            _with_backend("triton", run), _with_backend("torch", run), rtol=1e-5, atol=1e-6
        )


def check_optimizers(dev: str = "cpu") -> None:
    cases = [
        (GaLoreAdamW, {"rank": 4}),
        (GaLoreAdamW, {"rank": 4, "proj_type": "left"}),
        (ApolloAdamW, {"rank": 4}),
        (ApolloAdamW, {"rank": 4, "proj_type": "left"}),
        (ApolloMini, {"rank": 1}),
        (FrugalAdamW, {"density": 0.25}),
    ]
    for cls, group in cases:

        def run(cls=cls, group=group, tensor_lr=False):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(40, 24).to(dev))
            opt = cls([{"params": [p], "update_proj_gap": 2, **group}], lr=1e-2, weight_decay=0.1)
            if tensor_lr:  # set after construction (APOLLO's Triton update crashed on it)
                opt.param_groups[0]["lr"] = torch.tensor(1e-2, device=dev)
            for s in range(4):
                p.grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(s)).to(dev)
                opt.step()
            return p.detach()

        torch.testing.assert_close(
            _with_backend("triton", run),
            _with_backend("torch", run),
            rtol=1e-5,
            atol=1e-5,
            msg=f"{cls.__name__} {group}",
        )
        torch.testing.assert_close(
            _with_backend("triton", lambda cls=cls, group=group: run(cls, group, True)),
            _with_backend("torch", run),
            rtol=1e-5,
            atol=1e-5,
            msg=f"{cls.__name__} {group} with a tensor lr",
        )


def _fma(a, b, c):
    """fp32 fma through fp64 (the product is exact there)."""
    return (a.double() * b.double() + c.double()).float()


def _fused_adam_rounds_like_kernel(dev: str) -> bool:
    """Whether torch._fused_adamw_ here rounds as the lowbit kernel computes (CPU: it does)."""
    gen = torch.Generator().manual_seed(1)
    p, g, m = (torch.randn(4096, generator=gen).to(dev) for _ in range(3))
    v = torch.rand(4096, generator=gen).to(dev)
    pk, mk, vk = p.clone(), m.clone(), v.clone()
    step = torch.full((), 3.0, device=dev)
    torch._fused_adamw_([pk], [g], [mk], [vk], [], [step], lr=0.1, beta1=0.9, beta2=0.999,
                        weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
    f = lambda x: torch.tensor(x, dtype=torch.float32, device=dev)  # noqa: E731
    m = _fma(f(1 - 0.9), g - m, m)
    v = _fma(g * f(1 - 0.999), g, v * f(0.999))
    root = v.double().sqrt().float()  # correctly rounded (eager CPU sqrt need not be)
    den = root / f((1 - 0.999**3) ** 0.5) + f(1e-8)
    p = p * f(1 - 0.1 * 0.1) - f(0.1 / (1 - 0.9**3)) * m / den
    return torch.equal(mk, m) and torch.equal(vk, v) and torch.equal(pk, p)


_QKEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


def _lowbit_steps(dev, dtype, eps_mode, shape=(61, 300), steps=4, betas=(0.9, 0.999), grads=None):
    """``steps`` AdamW steps of adamw_many on int8 moments; (param, state, in place?)."""
    from memopt.optim import _full_adam

    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dev, dtype))
    group = {"lr": 1e-2, "betas": betas, "eps": 1e-8, "weight_decay": 0.1, "state_dtype": "int8"}
    st, ptrs = {"step": 0}, set()
    for s in range(steps):
        g = torch.randn(shape, generator=gen) if grads is None else grads[s]
        p.grad = g.to(dev, dtype)
        with torch.no_grad():
            _full_adam.adamw_many([p], [st], group, eps_mode)
        ptrs.add(st["exp_avg_q"].data_ptr())
    return p.detach(), st, len(ptrs) == 1


def check_lowbit_adam(dev: str = "cpu") -> None:
    """The fused int8 AdamW kernel against the eager dequantize/adam/quantize path."""
    exact = _fused_adam_rounds_like_kernel(dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for eps_mode in ("torch", "galore"):
            run = lambda d=dtype, e=eps_mode: _lowbit_steps(dev, d, e)  # noqa: E731
            (pt, st, _), (pk, sk, fused) = _with_backend("torch", run), _with_backend("triton", run)
            assert fused, "the Triton run did not go through the fused kernel (codes replaced)"
            msg = f"{dtype} {eps_mode}"
            if exact:  # same arithmetic, same quantization: the same bits
                assert torch.equal(pk, pt), msg
                for key in _QKEYS:
                    assert torch.equal(sk[key], st[key]), f"{msg} {key}"
                continue
            # torch's own fused kernel rounds otherwise (CUDA): float rounding, and a code may
            # move by one where a moment lies within rounding of a midpoint
            rtol = 1e-5 if dtype == torch.float32 else 2**-7  # one bf16/fp16 rounding apart
            torch.testing.assert_close(pk.float(), pt.float(), rtol=rtol, atol=1e-3, msg=msg)
            for key in ("exp_avg_q", "exp_avg_sq_q"):
                diff = (sk[key].int() - st[key].int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3, msg
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                torch.testing.assert_close(sk[key], st[key], rtol=1e-4, atol=1e-12, msg=msg)
    _check_lowbit_ties(dev)


def _check_lowbit_ties(dev: str) -> None:
    """Moments exactly on a code midpoint, and one ulp either side: the torch path's codes.

    With beta1 = 0 the first moment is the gradient itself, so each 256-block starts with
    +-1 (its absmax) and y = g exactly: ties must go to the lower code, as nearest_index does.
    """
    from memopt.optim.kernels import lowbit_adam

    mids = lowbit_adam.midpoints(True)
    vals = torch.cat([mids, mids.nextafter(mids.new_tensor(2.0)), mids.nextafter(-mids - 2)])
    blocks = vals.view(-1, 255).repeat(6, 1)  # 18 blocks: past MIN_LOWBIT_NUMEL
    sign = torch.where(torch.arange(blocks.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
    g = torch.cat([sign, blocks], dim=1).reshape(1, -1)
    run = lambda: _lowbit_steps(dev, torch.float32, "torch", g.shape, 1, (0.0, 0.5), [g])  # noqa: E731
    (_, st, _), (_, sk, fused) = _with_backend("torch", run), _with_backend("triton", run)
    assert fused
    for key in _QKEYS:
        assert torch.equal(sk[key], st[key]), f"{key} at code midpoints"


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    check_adam_update()
    check_scaled_update()
    check_optimizers()
    check_lowbit_adam()
    print("triton kernels match the torch path")
    sys.exit(0)
