"""Master weights in ``estimate`` against what ``memopt.shard`` holds (``memory/masters.py``).

The model: a tiny bf16 LLaMA with its first two of four decoder layers frozen, AdamW over
the trainable parameters, ``master_dtype=torch.float32``, ``layout="dim0"``. On 2 gloo ranks:

- stage 3: each rank holds fp32 shards of the trainable parameters (the masters) and bf16
  shards of the frozen ones; the estimate's parameters + master weights equal their sum
  (before: 247424 predicted, the fp32 shards alone, for 338304 held: the frozen shards were
  dropped when the masters replaced the parameters' bytes), and its step gradients equal the
  fp32 gradient shards (before: counted in bf16, half of them);
- stage 2: whole bf16 parameters (frozen included) plus fp32 masters of the rank's rows;
  the step's gradients are the masters' fp32 gradients (before: the bf16 buckets' bytes),
  while the backward's gradient figure stays the bf16 buckets'.

In-process: stage 3 on one process (the plain path) keeps bf16 parameters and fp32 copies
(before: predicted as FSDP2's fp32 shards alone); a master of the parameters' width in
another format is refused, as memopt.shard refuses it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memopt.memory import estimate
from tests._harness.dist import run_distributed
from tests.memory.conftest import tiny_config

BF16, FP32 = torch.bfloat16, torch.float32
LAYERS = 4
KW: dict[str, Any] = {
    "param_dtype": "bfloat16", "master_dtype": "float32", "layout": "dim0",
    "batch_size": 1, "seq_len": 8,
}  # fmt: skip


def _model(device: str | None = None) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM(tiny_config(layers=LAYERS)).to(BF16)
    for layer in model.model.layers[: LAYERS // 2]:
        layer.requires_grad_(False)
    return model


def _nbytes(tensors: Any) -> int:
    """Bytes of distinct storages (a DTensor's local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _copies(sopt: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the optimizer steps that are not (views of) the parameters: masters."""
    own = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
           for p in params}  # fmt: skip
    held = [t for g in sopt.param_groups for t in g["params"]]
    return [t for t in held if t.untyped_storage().data_ptr() not in own]


def _held(rank: int, world: int) -> dict[int, tuple[int, int, int]]:
    """Per stage: (parameter bytes, master-copy bytes, gradient bytes the step reads)."""
    import memopt

    out = {}
    for stage in (2, 3):
        model = _model()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model, sopt = memopt.shard(model, opt, stage=stage, layout="dim0", master_dtype=FP32)
        x = torch.randint(0, 256, (1, 8))
        model(input_ids=x, labels=x).loss.backward()
        sopt.finish_grad_sync()
        params = list(model.parameters())
        copies = _copies(sopt, params)
        if stage == 3:
            grads = _nbytes(p.grad for p in params if p.grad is not None)
        else:
            grads = _nbytes(t.grad for t in sopt.locals.values() if t.grad is not None)
        out[stage] = (_nbytes(params), _nbytes(copies), grads)
        sopt.step()
        if stage == 3:
            assert {(p.dtype, p.requires_grad) for p in params} == {(FP32, True), (BF16, False)}
    return out


def _share(stage: int, world: int) -> Any:
    """The ``shard_share`` the estimate is built on (its step-time gradients)."""
    from memopt.memory.estimate import EstimateConfig, find_units
    from memopt.memory.model import frozen_bytes, param_infos
    from memopt.memory.sharding import shard_share

    model = _model("meta")
    cfg = EstimateConfig(stage=stage, world_size=world, **KW)
    return shard_share(
        param_infos(model, None, BF16), "adamw", {}, stage, world, "dim0",
        find_units(model, cfg), frozen_bytes=frozen_bytes(model, BF16),
        state_infos=param_infos(model, None, FP32), master_size=4,
    )  # fmt: skip


def test_estimate_counts_masters_and_frozen_shards_as_two_ranks_hold_them() -> None:
    held = run_distributed(_held, world_size=2, timeout_s=240)
    assert held[0] == held[1]  # even rows: both ranks hold the same bytes
    for stage in (3, 2):
        params, copies, grads = held[0][stage]
        dev = estimate(_model("meta"), stage=stage, world_size=2, **KW).breakdown["device"]
        assert (dev["parameters"], dev["master_weights"]) == (params, copies), stage
        assert _share(stage, 2).grads == grads, stage
    assert held[0][3][1] == 0  # stage 3: no copies, the shards are the masters
    # stage 2: the backward still holds the bf16 buckets; the fp32 copies come at the step
    no_master = _share_without_master(2)
    assert _share(2, 2).bwd_grads == no_master.grads < _share(2, 2).grads


def _share_without_master(stage: int) -> Any:
    from memopt.memory.estimate import EstimateConfig, find_units
    from memopt.memory.model import frozen_bytes, param_infos
    from memopt.memory.sharding import shard_share

    model = _model("meta")
    infos = param_infos(model, None, BF16)
    units = find_units(model, EstimateConfig(stage=stage, world_size=2))
    return shard_share(infos, "adamw", {}, stage, 2, "dim0", units,
                       frozen_bytes=frozen_bytes(model, BF16))  # fmt: skip


def test_stage3_on_one_process_keeps_parameters_and_master_copies() -> None:
    import memopt

    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, sopt = memopt.shard(model, opt, stage=3, master_dtype=FP32)  # the plain path
    params = list(model.parameters())
    copies = _copies(sopt, params)
    dev = estimate(_model("meta"), stage=3, world_size=1, **KW).breakdown["device"]
    assert (dev["parameters"], dev["master_weights"]) == (_nbytes(params), _nbytes(copies))


@pytest.mark.parametrize(("param", "master"), [("float16", "bfloat16"), ("bfloat16", "float16")])
def test_same_width_master_is_refused(param: str, master: str) -> None:
    kw = dict(KW, param_dtype=param, master_dtype=master)
    with pytest.raises(ValueError, match=rf"master_dtype torch\.{master} has the same width as "
                       rf"param_dtype torch\.{param}.*master_dtype='float32'"):  # fmt: skip
        estimate(_model("meta"), stage=2, world_size=2, **kw)
