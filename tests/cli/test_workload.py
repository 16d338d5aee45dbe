"""The built-in workload of ``memopt estimate`` / ``memopt report``: the estimate prices the
optimizer the run builds, and the warm-up runs in the measured dtype."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memopt.optim as mo
from memopt.cli import _workload
from memopt.cli._workload import Workload
from memopt.memory import optimizer_state, param_infos

TINY: dict[str, Any] = {"hidden": 256, "layers": 1, "vocab": 200, "batch_size": 1, "seq_len": 8}


@pytest.mark.parametrize(
    "flags",
    [
        {"optimizer": "apollo"},  # estimated at rank 256 (the rules' default), ran at 128
        {"optimizer": "galore", "density": 0.25},  # the run ignored --density (rank 128)
        {"optimizer": "apollo", "density": 0.25},
        {"optimizer": "natural_galore", "density": 0.25},
        {"optimizer": "frugal", "rank": 4},  # the run ignored --rank (density 0.25)
        {"optimizer": "apollo_mini", "state_dtype": "int8"},
    ],
    ids=str,
)
def test_estimate_prices_the_optimizer_the_run_builds(flags: dict[str, Any]) -> None:
    from transformers import LlamaForCausalLM

    w = Workload(**TINY, **flags)
    torch.manual_seed(0)
    model = LlamaForCausalLM(w.llama_config())
    opt = _workload.build_optimizer(w, model)
    x = torch.randint(0, w.vocab, (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    real = mo.state_bytes(opt)
    rule = optimizer_state(param_infos(model), w.optimizer, w.optimizer_kwargs())
    assert (rule.total, rule.cache) == (real.total, real.cache)
    est = w.estimate().breakdown["device"]["optimizer_state"]
    tables = {"int8": 86_056}.get(flags.get("state_dtype", ""), 0)
    assert est == real.total + real.cache + tables


def test_adamw_refuses_a_rank_in_the_run_too() -> None:
    from transformers import LlamaForCausalLM

    w = Workload(**TINY, optimizer="adamw", rank=8)
    with pytest.raises(ValueError, match="adamw keeps full state"):
        _workload.build_optimizer(w, LlamaForCausalLM(w.llama_config()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_warm_up_runs_in_the_measured_dtype(monkeypatch, dtype: str) -> None:
    """bf16 kernels' one-time buffers (~16 MiB on CPU) must land before the baseline: a fp32
    warm-up left them in the measured run (memopt report read 0.78 for bf16)."""
    seen: list[torch.dtype] = []
    build = _workload.build_optimizer

    def spy(w: Workload, model: torch.nn.Module) -> torch.optim.Optimizer:
        seen.append(next(model.parameters()).dtype)
        return build(w, model)

    monkeypatch.setattr(_workload, "build_optimizer", spy)
    _workload.warm_up(Workload(**TINY, param_dtype=dtype))
    assert seen == [_workload.DTYPES[dtype]]
