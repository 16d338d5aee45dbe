"""``master_dtype`` against the parameters' dtype: one rule at stages 1, 2 and 3
(``memopt/sharding/masters.py``).

- A master of the same width in another format (bf16 masters of an fp16 model, fp16 masters
  of a bf16 one) is refused at every stage, on one process and on 2 ranks, before anything
  changes, with a message naming the parameter and master_dtype=torch.float32. Before,
  stages 1/2 (and stage 3 on one process) kept bf16 copies of fp16 weights, while stage 3 on
  2 ranks stepped the fp16 parameters directly (``_narrower(fp16, bf16)`` is False).
- fp32 masters of an fp16 model: every stage keeps fp32 masters of this rank's part and
  trains (the consistent alternative the message points to).
- A master narrower than a parameter at stages 1/2 is refused before the optimizer's groups
  are touched (before: with ``dim0`` the parameters ahead of the refused one had already been
  replaced by row views or master copies in the caller's optimizer).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt
from tests._harness.dist import run_distributed

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
SAME_WIDTH = (
    r"master_dtype=torch\.{m} has the same width as the parameter '0\.weight' \(torch\.{d}, "
    r"16 bits\) in another format.*master_dtype=torch\.float32.*master_dtype=None"
)


def _model(dtype: torch.dtype, second: torch.dtype | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6, dtype=dtype), nn.Linear(6, 4, dtype=second or dtype))


def _refused(stage: int, dtype: torch.dtype, master: torch.dtype, match: str, **kw: object) -> None:
    """memopt.shard raises ``match``; the model and the caller's optimizer are as before."""
    model = _model(dtype, kw.pop("second", None))  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        memopt.shard(model, opt, stage=stage, master_dtype=master, **kw)  # type: ignore[arg-type]
    now = list(model.parameters())
    assert len(now) == len(params) and all(a is b for a, b in zip(now, params, strict=True))
    assert all(not hasattr(p, "full_tensor") for p in params), "sharded anyway"
    assert all(
        torch.equal(p, b) and p.dtype == b.dtype for p, b in zip(params, before, strict=True)
    )
    held = opt.param_groups[0]["params"]
    assert len(held) == len(params) and all(h is p for h, p in zip(held, params, strict=True)), (
        "the optimizer's groups were changed"
    )
    assert not opt.state


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize(("dtype", "master"), [(FP16, BF16), (BF16, FP16)])
def test_same_width_master_is_refused_at_every_stage(stage, dtype, master) -> None:
    match = SAME_WIDTH.format(m=str(master)[6:], d=str(dtype)[6:])
    _refused(stage, dtype, master, match, layout="dim0")
    if stage != 3:
        _refused(stage, dtype, master, match, layout="whole_tensor")


@pytest.mark.parametrize("stage", [1, 2])
def test_narrow_master_leaves_the_optimizer_untouched(stage) -> None:
    # fp16 first (its row view would enter the groups), then fp32 (narrower than the master)
    _refused(stage, FP16, FP16, r"master_dtype=torch\.float16 is narrower than the parameter "
             r"'1\.weight' \(torch\.float32\)", second=FP32, layout="dim0")  # fmt: skip


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp32_masters_of_an_fp16_model_one_process(stage) -> None:
    model = _model(FP16)
    model, opt = memopt.shard(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                              stage=stage, master_dtype=FP32)  # fmt: skip
    assert {t.dtype for g in opt.param_groups for t in g["params"]} == {FP32}
    assert {p.dtype for p in model.parameters()} == {FP16}


# -- 2 ranks -----------------------------------------------------------------------------------
def _two_ranks(rank: int, world: int) -> list[str]:
    """Per stage: the refusal on this rank (then no collective pending), and with fp32
    masters the dtypes the optimizer steps and the parameters after 2 steps."""
    out = []
    for stage in (1, 2, 3):
        model = _model(FP16)
        with pytest.raises(ValueError, match=SAME_WIDTH.format(m="bfloat16", d="float16")):
            memopt.shard(model, torch.optim.AdamW(model.parameters()), stage=stage,
                         layout="dim0", master_dtype=BF16)  # fmt: skip
        assert not any(hasattr(p, "full_tensor") for p in model.parameters()), "sharded anyway"
        flag = torch.ones(1)
        torch.distributed.all_reduce(flag)  # both ranks raised before any collective of memopt's
        assert flag.item() == world
        model = _model(FP16)
        model, opt = memopt.shard(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                  stage=stage, layout="dim0", master_dtype=FP32)  # fmt: skip
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            x = torch.randn(4, 8, generator=g, dtype=FP16)
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        held = sorted({str(t.dtype) for grp in opt.param_groups for t in grp["params"]})
        params = sorted({str(p.dtype) for p in model.parameters()})
        out.append(f"stage {stage}: steps {held}, parameters {params}")
    return out


def test_two_ranks_every_stage_refuses_same_width_and_keeps_fp32_masters() -> None:
    got = run_distributed(_two_ranks, world_size=2, timeout_s=120)
    # stage 3's parameters are the fp32 masters themselves (FSDP2 gathers them in fp16)
    want = [
        "stage 1: steps ['torch.float32'], parameters ['torch.float16']",
        "stage 2: steps ['torch.float32'], parameters ['torch.float16']",
        "stage 3: steps ['torch.float32'], parameters ['torch.float32']",
    ]
    assert got == [want, want]
