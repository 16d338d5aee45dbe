"""Every update path bumps the parameter's autograd version counter, as torch's in-place ops
do, so a step taken between forward and backward fails loudly instead of corrupting the
gradients. The native (ctypes) and Triton kernels write through raw pointers and bump it
themselves (``memopt._utils.native.mark_written``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.offload import cpu_gemm
from memopt.offload.cpu_adam import native_available
from memopt.optim import AdamW, ApolloAdamW, GaLoreAdamW

AMX = pytest.mark.skipif(not cpu_gemm.available(), reason="no AMX-BF16 or no native library")
NATIVE = pytest.mark.skipif(not native_available(), reason="native library not built")


def _galore(ps, fused=True, **extra):
    opt = GaLoreAdamW([{"params": ps, "rank": 8, "update_proj_gap": 50, **extra}], lr=1e-2)
    opt.fused_steady_step = fused
    return opt


CASES = {
    "adamw native": (lambda ps: AdamW(ps, lr=1e-2), [NATIVE]),
    "adamw int8 native": (lambda ps: AdamW(ps, lr=1e-2, state_dtype="int8"), [NATIVE]),
    "galore fp32 (torch GEMMs)": (lambda ps: _galore(ps), []),
    "galore bf16 one call": (lambda ps: _galore(ps, matmul_dtype="bfloat16"), [AMX]),
    "galore bf16 step by step": (
        lambda ps: _galore(ps, fused=False, matmul_dtype="bfloat16"),
        [AMX],
    ),
    "apollo": (lambda ps: ApolloAdamW([{"params": ps, "rank": 8}], lr=1e-2), []),
}


@pytest.mark.parametrize("make", [pytest.param(f, marks=m, id=k) for k, (f, m) in CASES.items()])
def test_a_step_between_forward_and_backward_is_caught(make) -> None:
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(64, 64, generator=gen))
    opt = make([w])
    for _ in range(2):  # past the first step's refresh: the steady path
        w.grad = torch.randn(64, 64, generator=gen)
        opt.step()
    loss = (w * w).sum()  # saves w for backward
    before = w._version
    w.grad = torch.randn(64, 64, generator=gen)
    opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
