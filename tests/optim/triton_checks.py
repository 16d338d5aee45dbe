"""Triton kernels against the torch path, on CPU under TRITON_INTERPRET=1.

Run by test_triton_kernels.py in a subprocess, because Triton decides at import time
whether kernels are interpreted. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from memopt.optim import ApolloAdamW, ApolloMini, FrugalAdamW, GaLoreAdamW, kernels  # noqa: E402


def _with_backend(name, fn):
    os.environ["MEMOPT_KERNELS"] = name
    try:
        return fn()
    finally:
        os.environ.pop("MEMOPT_KERNELS", None)


def check_adam_update() -> None:
    for shape in [(33, 17), (5, 300)]:
        for norms_dim in (None, 0, 1):
            for eps_mode in ("galore", "torch"):
                torch.manual_seed(0)
                low = torch.randn(shape)
                m0, v0 = torch.randn(shape), torch.rand(shape)

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


def check_scaled_update() -> None:
    torch.manual_seed(0)
    w0, g = torch.randn(7, 300), torch.randn(7, 300)
    for factor in (torch.tensor(0.7), torch.rand(7, 1), torch.rand(1, 300)):

        def run(factor=factor):
            w = w0.clone()
            kernels.scaled_update_(w, g, factor, alpha=-0.3, keep=0.99)
            return w

        torch.testing.assert_close(
            _with_backend("triton", run), _with_backend("torch", run), rtol=1e-5, atol=1e-6
        )


def check_optimizers() -> None:
    cases = [
        (GaLoreAdamW, {"rank": 4}),
        (GaLoreAdamW, {"rank": 4, "proj_type": "left"}),
        (ApolloAdamW, {"rank": 4}),
        (ApolloAdamW, {"rank": 4, "proj_type": "left"}),
        (ApolloMini, {"rank": 1}),
        (FrugalAdamW, {"density": 0.25}),
    ]
    for cls, group in cases:

        def run(cls=cls, group=group):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(40, 24))
            opt = cls([{"params": [p], "update_proj_gap": 2, **group}], lr=1e-2, weight_decay=0.1)
            for s in range(4):
                p.grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(s))
                opt.step()
            return p.detach()

        torch.testing.assert_close(
            _with_backend("triton", run),
            _with_backend("torch", run),
            rtol=1e-5,
            atol=1e-5,
            msg=f"{cls.__name__} {group}",
        )


if __name__ == "__main__":
    check_adam_update()
    check_scaled_update()
    check_optimizers()
    print("triton kernels match the torch path")
    sys.exit(0)
