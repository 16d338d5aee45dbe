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


def test_mark_written_on_a_torch_that_takes_one_tensor_at_a_time(monkeypatch) -> None:
    from memopt._utils import native

    real = torch._C._increment_version

    def one_at_a_time(arg):
        if isinstance(arg, list):
            raise TypeError("expects a Tensor")
        return real(arg)

    monkeypatch.setattr(torch._C, "_increment_version", one_at_a_time)
    monkeypatch.setattr(native, "_BATCH_BUMP", True)
    a, b = torch.zeros(3), torch.zeros(2)
    native.mark_written(a, None, b)
    native.mark_written(a)
    assert (a._version, b._version) == (2, 1)
    assert native._BATCH_BUMP is False
