"""The optimizer step's working memory (``memopt.memory.step``) and gradient accumulation
against torch's allocator events of real CPU steps (``torch.profiler`` with
``profile_memory``: every allocation and free through c10's CPU allocator)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import memopt.optim as mo
from memopt.memory import estimate, optstate
from memopt.memory.model import ParamInfo, param_infos
from memopt.memory.step import LOWBIT_TABLE_BYTES, step_temporaries
from tests.memory.conftest import tiny_config


def _alloc_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated above the start while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def _second_step_peak(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> int:
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state and the 8-/4-bit tables exist from here on
    for p in params:
        p.grad = torch.randn_like(p)
    return _alloc_peak(opt.step)


@pytest.mark.parametrize(
    ("state_dtype", "dtype", "rows"),
    [
        (None, torch.bfloat16, 2048),  # fused in place
        ("int8", torch.float32, 2048),  # the native kernel steps the codes in place
        ("int8", torch.bfloat16, 2048),
        ("int4", torch.float32, 512),  # under one quantization chunk
        ("int4", torch.float32, 2048),  # four chunks
        ("int4", torch.bfloat16, 2048),  # + fp32 copies of the weights and gradient
        ("float32", torch.bfloat16, 2048),  # fp32 moments of bf16 weights: fp32 copies
    ],
    ids=str,
)
def test_full_state_step_temporaries_equal_the_allocations(state_dtype, dtype, rows) -> None:
    """8-bit state needs no fp32 working moments on CPU (predicted 12 B per element of the
    largest tensor: 1.43-1.71 of a step-bound peak); 4-bit dequantizes the whole tensor."""
    p = torch.nn.Parameter(torch.randn(rows, 512, dtype=dtype))
    kw = {"state_dtype": state_dtype} if state_dtype else {}
    measured = _second_step_peak(mo.AdamW([p], **kw), [p])
    info = ParamInfo("w", tuple(p.shape), dtype, False)
    predicted = step_temporaries("adamw", optstate.resolve("adamw", kw), [info])
    assert predicted == pytest.approx(measured, abs=64)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("galore", {"rank": 32}), ("frugal", {"density": 0.25})],
)
def test_projected_step_temporaries_equal_the_allocations(name: str, kwargs: dict) -> None:
    """Dense projectors update through a fused addmm_ (no full-size update: 4 B per element
    of the largest projected matrix were charged); FRUGAL keeps its full-size residual."""
    p = torch.nn.Parameter(torch.randn(1408, 512))
    cls = {"galore": mo.GaLoreAdamW, "frugal": mo.FrugalAdamW}[name]
    measured = _second_step_peak(cls([{"params": [p], **kwargs}]), [p])
    info = ParamInfo("w", tuple(p.shape), p.dtype, True)
    assert step_temporaries(name, optstate.resolve(name, kwargs), [info]) == measured


def test_lowbit_tables_are_counted(monkeypatch) -> None:
    """The code and search tables (module constants, once per device and process) that 8-
    and 4-bit state build on CPU; the estimate adds them to the optimizer state."""
    from memopt.optim.kernels import lowbit_adam
    from memopt.optim.lowbit import native, quant

    caches = [(quant, "_MAPS"), (quant, "_TABLES"), (lowbit_adam, "_TABLES"),
              (lowbit_adam, "_NATIVE_TABLES"), (native, "_REFERENCE_CODES")]  # fmt: skip
    for module, name in caches:  # empty, as in a fresh process (restored after the test)
        monkeypatch.setattr(module, name, {})
    for kind in ("int8", "int4"):
        p = torch.nn.Parameter(torch.randn(64, 128))
        _second_step_peak(mo.AdamW([p], state_dtype=kind), [p])
    seen: set[int] = set()

    def nbytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            new = st.data_ptr() not in seen and obj.device.type == "cpu"
            seen.add(st.data_ptr())
            return st.nbytes() if new else 0
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (tuple, list)):
            return sum(nbytes(v) for v in obj)
        return nbytes(obj()) if callable(obj) and type(obj).__name__ == "ReferenceType" else 0

    built = sum(nbytes(getattr(module, name)) for module, name in caches)
    assert built == sum(LOWBIT_TABLE_BYTES.values())
    cfg = tiny_config()
    plain = estimate(cfg, batch_size=1, seq_len=8).breakdown["device"]["optimizer_state"]
    int4 = estimate(cfg, optimizer_kwargs={"state_dtype": "int4"}, batch_size=1, seq_len=8)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        infos = param_infos(LlamaForCausalLM(cfg), None)
    rules = optstate.optimizer_state(infos, "adamw", {"state_dtype": "int4"}).memory
    assert int4.breakdown["device"]["optimizer_state"] == rules + LOWBIT_TABLE_BYTES["int4"]
    assert plain == 2 * sum(p.nbytes for p in infos)


def _live_bytes() -> int:
    gc.collect()
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type == "cpu":
            st = o.untyped_storage()
            if st.data_ptr():
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("accum", [1, 2])
def test_gradient_accumulation_peak_equals_the_allocations(accum: int) -> None:
    """Micro-batches after the first run with every gradient live: the estimate read 0.86
    with grad_accum=2 (train.grad_accum was dropped without a note)."""
    from transformers import LlamaForCausalLM

    before = _live_bytes()  # (what earlier tests left: the 8-/4-bit tables ...)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(hidden=128, vocab=1000))
    opt = mo.AdamW(model.parameters())
    x = torch.randint(0, 1000, (2, 64))

    def step() -> None:
        for _ in range(accum):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    measured = _live_bytes() - before - x.untyped_storage().nbytes() + _alloc_peak(step)
    est = estimate(model, batch_size=2, seq_len=64, grad_accum=accum)
    assert est.peak["device"] == pytest.approx(measured, rel=0.002)
    assert any("grad_accum" in n for n in est.notes) == (accum > 1)
