"""The optimizers on a CUDA device: same results as on CPU, compiled Triton kernels, memory.

Skipped where ``torch.cuda.is_available()`` is False (the ``gpu`` marker, see conftest).
"""

from __future__ import annotations

import pytest
import torch

from memopt import optim as mo
from tests.optim import triton_checks

pytestmark = pytest.mark.gpu

# Same numbers on CPU and GPU where the update is well conditioned: the gradients have a
# clear rank-4 structure (so the top singular subspace is stable to rounding) and nothing
# random is drawn on the device. The sign of each singular vector is arbitrary and differs
# between CPU and GPU SVDs, so moments kept across a refresh (GaLore's default) differ: those
# cases take no refresh after step 0, or reset / rotate the moments.
SAME_ON_CPU = [
    (mo.AdamW, {}),
    (mo.AdamW, {"state_dtype": "int8"}),
    (mo.GaLoreAdamW, {"rank": 4, "update_proj_gap": 100}),
    (mo.GaLoreAdamW, {"rank": 4, "moments": "reset"}),
    (mo.GaLoreAdamW, {"rank": 4, "moments": "rotate", "proj": "gram"}),
    (mo.GaLoreAdamW, {"rank": 4, "update_proj_gap": 100, "state_dtype": "int8"}),
    (mo.FrugalAdamW, {"density": 0.25, "proj": "block"}),
]
# Drawn on the device (APOLLO's Gaussian matrix, the randomized SVD's sketch), with a sign
# step that flips on rounding (FRUGAL's state-free part), or ill-conditioned (below): CPU and
# GPU differ, but a GPU run must be deterministic and resume bit-exactly.
GPU_ONLY = [
    (mo.ApolloAdamW, {"rank": 4}),
    (mo.ApolloAdamW, {"rank": 4, "proj_type": "left"}),
    (mo.ApolloMini, {"rank": 1}),
    (mo.GaLoreAdamW, {"rank": 4, "proj": "rsvd"}),
    (mo.FrugalAdamW, {"density": 0.25}),
    # Natural GaLore's map g -> (damping I + H^T H)^-1 g amplifies what lies outside the
    # history's span by 1/damping: on CPU alone, a 1e-6 relative change of the gradients moves
    # the parameters by 1e-2 after 7 steps, so CPU and GPU rounding diverge the same way.
    (mo.NaturalGaLoreAdamW, {"rank": 4, "update_proj_gap": 100}),
]
SHAPES = [(96, 64), (64, 160), (64,)]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for s in SHAPES:
        if len(s) == 2:
            a, b = torch.randn(s[0], 4, generator=gen), torch.randn(4, s[1], generator=gen)
            out.append(a @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0])) @ b
                       + 1e-3 * torch.randn(s, generator=gen))
        else:
            out.append(torch.randn(s, generator=gen))
    return out


def _build(cls, group, params):
    low = {"params": params[:2], "update_proj_gap": 3} | group
    if cls is mo.AdamW:
        return cls(params, lr=1e-2, weight_decay=0.1, **group)
    return cls([low, {"params": params[2:]}], lr=1e-2, weight_decay=0.1)


def _train(cls, group, dev: str, steps: int = 7, resume_at: int | None = None):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dev)) for s in SHAPES]
    opt = _build(cls, group, params)
    for t in range(steps):
        if t == resume_at:
            saved = opt.state_dict()
            opt = _build(cls, group, params)
            opt.load_state_dict(saved)
        for p, g in zip(params, _grads(t), strict=True):
            p.grad = g.to(dev)
        opt.step()
    for st in opt.state.values():
        for key, t in st.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                assert t.device.type == torch.device(dev).type, f"state {key} on {t.device}"
    return [p.detach().cpu() for p in params]


def _ids(c):
    return getattr(c, "__name__", str(c))


@pytest.mark.parametrize(("cls", "group"), SAME_ON_CPU, ids=_ids)
def test_cuda_matches_cpu(cls, group):
    cpu, gpu = _train(cls, group, "cpu"), _train(cls, group, "cuda")
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("cls", "group"), SAME_ON_CPU + GPU_ONLY, ids=_ids)
def test_cuda_deterministic_and_resumes_exactly(cls, group):
    first, again = _train(cls, group, "cuda"), _train(cls, group, "cuda")
    resumed = _train(cls, group, "cuda", resume_at=4)
    for a, b, c in zip(first, again, resumed, strict=True):
        assert torch.equal(a, b), f"{cls.__name__} {group}: two GPU runs differ"
        assert torch.equal(a, c), f"{cls.__name__} {group}: resumed run differs"


def test_compiled_triton_kernels_match_torch_path():
    triton_checks.check_adam_update("cuda")
    triton_checks.check_scaled_update("cuda")
    triton_checks.check_optimizers("cuda")
    triton_checks.check_lowbit_adam("cuda")


def test_in_backward_frees_gradients_on_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    def grad_bytes_after_backward(in_backward: bool) -> tuple[int, int]:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
        model = LlamaForCausalLM(cfg).cuda()
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        opt = mo.AdamW(model.parameters(), lr=1e-4)
        handle = mo.step_in_backward(model, opt) if in_backward else None
        x = torch.randint(0, 4096, (2, 64), device="cuda")
        for _ in range(2):  # the second step: optimizer state already exists
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            model(x, labels=x).loss.backward()
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before
            opt.step()
            opt.zero_grad(set_to_none=True)
        if handle is not None:
            handle.remove()
        return held, total

    (plain, grads), (fused, _) = grad_bytes_after_backward(False), grad_bytes_after_backward(True)
    assert plain >= 0.9 * grads, (plain, grads)  # the whole model's gradients
    assert fused < 0.1 * grads, (fused, grads)  # each one freed by its own update
