"""Offloaded AdamW (fp32 master + moments on a tier, double-buffered pipeline) vs torch AdamW.

Parity on the pinned CPU tier (in place, and streamed through the pipeline) and on the NVMe
tier (a temp dir on ext4, O_DIRECT), with small buckets so a step has several groups; the
event log shows the read of group i+1 issued before group i's update ends and the write of
group i-1 still allowed in flight during it; bf16 parameters get the fp32 master's rounding;
state_dict round trips through ``torch.load(weights_only=True)``; error paths.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from memopt.offload import PinnedArena
from memopt.offload.arena import ArenaConfig
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.optimizer import OffloadConfig, OffloadedAdamW
from memopt.offload.pinned_tier import PinnedCPUTier
from memopt.offload.pipeline import AdamHyper, OffloadedAdamState, StepItem

ATOL = 1e-6
SHAPES = [(37, 29), (64,), (129, 17), (5,), (40, 40), (3, 7, 11)]
STEPS = 5
SMALL = OffloadConfig(bucket_bytes=8 << 10)  # several chunks and groups per step


def _params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(0.1 * torch.randn(s, generator=g)).to(dtype).requires_grad_() for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    return [
        {"params": params[:3], "lr": 1e-2, "weight_decay": 0.1},
        {"params": params[3:], "lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.0},
    ]


def _run(
    opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range, round_to=None
) -> None:
    sched = torch.optim.lr_scheduler.LambdaLR(  # resumes where the schedule was
        opt, lambda s: 1.0 / (1.0 + 0.2 * s), last_epoch=steps.start - 1
    )
    for s in steps:
        for p, g in zip(params, _grads(s), strict=True):
            p.grad = g.to(round_to or p.dtype).to(p.dtype)
        opt.step()
        sched.step()
        opt.zero_grad()


def _nvme(tmp_path: Path, arena: PinnedArena) -> NVMeTier:
    cfg = NVMeConfig(directory=tmp_path, capacity_bytes=4 << 20, block_size=64 << 10)
    return NVMeTier(cfg, arena=arena)


@pytest.fixture
def arena() -> PinnedArena:
    a = PinnedArena(ArenaConfig(pin="off"))
    yield a
    a.close()


def _check_parity(opt: OffloadedAdamW, params: list[torch.Tensor]) -> None:
    ref_params = _params()
    ref = torch.optim.AdamW(_groups(ref_params), lr=1e-2)
    _run(ref, ref_params, range(STEPS))
    _run(opt, params, range(STEPS))
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), atol=ATOL, rtol=0)
        master, m, v = opt.read_state(p)
        torch.testing.assert_close(master, r.detach(), atol=ATOL, rtol=0)
        torch.testing.assert_close(m, ref.state[r]["exp_avg"], atol=ATOL, rtol=0)
        torch.testing.assert_close(v, ref.state[r]["exp_avg_sq"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("in_place", [True, False])
def test_cpu_tier_equals_torch_adamw(arena: PinnedArena, in_place: bool) -> None:
    params = _params()
    tier = PinnedCPUTier(arena)
    opt = OffloadedAdamW(_groups(params), lr=1e-2, tier=tier, record_events=True, offload=SMALL)
    opt.store.in_place = in_place  # before the first step: state is made then
    _check_parity(opt, params)
    assert len(opt.store.stats.groups) >= 3
    assert opt.store.stats.bytes_read == (0 if in_place else opt.store.stats.bytes_written)
    # streamed: tensors above 1024 elements (8 KiB / 12 B in pages) span several chunks;
    # in place (no staging to bound): one chunk per tensor
    chunks = sum(-(-math.prod(s) // 1024) for s in SHAPES) if not in_place else len(SHAPES)
    assert tier.report().live_handles == chunks
    opt.close()
    assert tier.report().live_handles == 0


def test_host_tier_state_is_one_exact_reservation() -> None:
    arena = PinnedArena(ArenaConfig(pin="off", chunk_bytes=4096))  # grows by the request
    params = _params(torch.bfloat16)
    opt = OffloadedAdamW(_groups(params), tier=PinnedCPUTier(arena))
    _run(opt, params, range(1))
    # reserve(): the arena grew once, by exactly the state (not a chunk per tensor)
    assert arena.chunk_count() == 1 and arena.report().capacity_bytes == opt.store.nbytes()
    opt.close()
    arena.close()


def test_nvme_tier_equals_torch_adamw_and_overlaps(tmp_path: Path, arena: PinnedArena) -> None:
    params = _params()
    tier = _nvme(tmp_path, arena)
    opt = OffloadedAdamW(_groups(params), lr=1e-2, tier=tier, record_events=True, offload=SMALL)
    assert tier.direct and not opt.store.in_place
    _check_parity(opt, params)
    stats = opt.store.stats
    assert stats.steps == STEPS and len(stats.groups) >= 4
    assert stats.bytes_read == stats.bytes_written == STEPS * opt.store.nbytes()
    events = opt.store.events
    last = [i for i, e in enumerate(events) if e == ("read_issue", 0)][-1]
    step = events[last:]  # the last step's events
    at = {e: i for i, e in enumerate(step)}
    n = len(stats.groups)
    for i in range(n - 1):
        # read(i+1) is issued before update(i) starts, and so before it ends
        assert at[("read_issue", i + 1)] < at[("update_start", i)] < at[("update_end", i)]
    for i in range(1, n):
        # write(i-1) is issued before update(i) and waited for only before read(i+2)
        assert at[("write_issue", i - 1)] < at[("update_start", i)]
    opt.close()
    tier.close()


def test_bf16_params_take_the_fp32_master_rounded(tmp_path: Path, arena: PinnedArena) -> None:
    params = _params(torch.bfloat16)
    masters = [p.detach().float().requires_grad_() for p in params]
    tier = _nvme(tmp_path, arena)
    opt = OffloadedAdamW(_groups(params), lr=1e-2, tier=tier, offload=SMALL)
    ref = torch.optim.AdamW(_groups(masters), lr=1e-2)
    _run(opt, params, range(STEPS))
    _run(ref, masters, range(STEPS), torch.bfloat16)  # the same bf16 gradients, upcast
    for p, r in zip(params, masters, strict=True):
        assert p.dtype == torch.bfloat16
        master = opt.read_state(p)[0]
        torch.testing.assert_close(master, r.detach(), atol=ATOL, rtol=0)
        assert torch.equal(p.detach(), master.to(torch.bfloat16))
    opt.close()
    tier.close()


def test_state_dict_round_trip(tmp_path: Path, arena: PinnedArena) -> None:
    params = _params()
    a = OffloadedAdamW(_groups(params), lr=1e-2, tier=_nvme(tmp_path / "a", arena), offload=SMALL)
    _run(a, params, range(3))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "master"}
    assert sd["state"][0]["exp_avg"].dtype == torch.float32
    clone = [p.detach().clone().requires_grad_() for p in params]
    b = OffloadedAdamW(_groups(clone), lr=1.0, tier=PinnedCPUTier(arena))
    b.load_state_dict(sd)
    assert [g["lr"] for g in b.param_groups] == [g["lr"] for g in a.param_groups]
    _run(a, params, range(3, 5))
    _run(b, clone, range(3, 5))
    for p, q in zip(params, clone, strict=True):
        assert torch.equal(p, q)
        for x, y in zip(a.read_state(p), b.read_state(q), strict=True):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="param groups"):
        OffloadedAdamW([params[0]], tier=PinnedCPUTier(arena)).load_state_dict(sd)
    a.close()
    a.tier.close()


def test_pipeline_errors_and_edges(arena: PinnedArena, tmp_path: Path) -> None:
    tier = PinnedCPUTier(arena)
    store = OffloadedAdamState(tier, bucket_bytes=1 << 20)
    store.add("w", torch.ones(10))
    hyper = AdamHyper(step=1, lr=0.1)
    with pytest.raises(ValueError, match="grad has 9 elements"):
        store.step([StepItem("w", torch.ones(9), torch.ones(10), hyper)])
    with pytest.raises(KeyError, match="add\\(\\) it first"):
        store.step([StepItem("nope", torch.ones(10), torch.ones(10), hyper)])
    with pytest.raises(ValueError, match="bucket_bytes"):
        OffloadedAdamState(tier, bucket_bytes=0)
    with pytest.raises(ValueError, match="in_place=True needs"):
        OffloadedAdamState(_nvme(tmp_path, arena), in_place=True)
    store.step([])  # nothing to do
    store.close()
    assert tier.report().live_handles == 0


def test_offload_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'cpu' or 'nvme'"):
        OffloadConfig(device="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs nvme_path"):
        OffloadConfig(device="nvme")
    with pytest.raises(ValueError, match="bucket_bytes"):
        OffloadConfig(bucket_bytes=0)
    tier = OffloadConfig(device="nvme", nvme_path=tmp_path, pin_memory=False).make_tier(rank=3)
    assert isinstance(tier, NVMeTier) and tier.file.path.name == "memopt-rank3.swap"
    tier.close()
    assert isinstance(OffloadConfig().make_tier(), PinnedCPUTier)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
     ({"weight_decay": -0.5}, "weight_decay must be a finite number >= 0"),
     ({"eps": float("nan")}, "eps must be a finite"),
     ({"betas": (0.9,)}, "betas must be two numbers"),
     ({"betas": (0.9, 1.5)}, "betas must be two numbers")],
)  # fmt: skip
def test_offloaded_adamw_hyperparameters_are_checked(kwargs: dict, match: str) -> None:
    p = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=match):
        OffloadedAdamW([p], **kwargs)
    opt = OffloadedAdamW([p])
    with pytest.raises(ValueError, match="lr must be a finite number"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("dtype", "lost"), [(torch.complex64, "imaginary"),
                                              (torch.float64, "precision")])  # fmt: skip
def test_offloaded_adamw_refuses_what_fp32_state_would_lose(dtype: torch.dtype, lost: str) -> None:
    with pytest.raises(TypeError, match=f"would lose (its )?{lost}"):
        OffloadedAdamW([torch.nn.Parameter(torch.randn(4, 4, dtype=dtype))])


def test_offloaded_adamw_sparse_gradient_changes_nothing() -> None:
    w, e = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(10, 4))
    opt = OffloadedAdamW([w, e], lr=0.1)
    w.grad, e.grad = torch.randn(8), torch.randn(10, 4).to_sparse()
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients.*nothing was updated"):
        opt.step()
    assert torch.equal(w, before) and not opt.state
    opt.close()


def test_state_dict_leaves_the_offloaded_state_on_the_tier() -> None:
    # torch's state_dict hands out the live per-parameter dicts: writing the read-back tensors
    # into them kept a full fp32 copy of master and moments in memory for the rest of the run
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = OffloadedAdamW([p], lr=1e-3)
    p.grad = torch.randn(64, 64)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) >= {"exp_avg", "exp_avg_sq", "master", "step"}
    assert set(opt.state[p]) == {"step"}
    opt.close()
