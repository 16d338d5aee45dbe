"""ZeRO 1/2 with ``offload=``: the optimizer passed to ``memopt.shard`` and the stepping
``OffloadedAdamW`` share their param groups, and the ranks fail together on an inner-step error.

- An LR scheduler made on the optimizer before ``memopt.shard`` (the usual accelerate order,
  ``memopt.integrations.accelerate.prepare`` included) reaches the step: ``offload_inner``
  built new group dicts, so the scheduler changed groups nothing read and training ran at the
  initial LR (0.048 off torch after 8 steps), silently. Manual edits of ``betas`` /
  ``weight_decay`` / ``eps`` through the old optimizer's groups reach it too.
- A tier error (ENOSPC) in one rank's offloaded step made that rank raise while the others
  waited in the parameter gather until the process group's timeout; now every rank raises,
  the healthy ones naming the failed rank, its error, and that their own step completed.
"""

from __future__ import annotations

import errno
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.offload import NVMeConfig, OffloadConfig
from memopt.offload.optimizer import OffloadedAdamW
from tests._harness.dist import run_distributed


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 7, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: Any, sched: Any, edit: bool) -> None:
    for i, (x, y) in enumerate(_batches()):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        if edit and i == 3:  # manual edits through the optimizer the scheduler holds
            g = sched.optimizer.param_groups[0]
            g["betas"], g["weight_decay"], g["eps"] = (0.5, 0.9), 0.3, 1e-3


def _pair() -> tuple[nn.Module, Any, Any]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)


def _gap(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_scheduler_made_before_shard_reaches_the_offloaded_step(
    tmp_path: Path, device: str
) -> None:
    ref, ref_opt, ref_sched = _pair()
    _train(ref, ref_opt, ref_sched, edit=True)
    model, opt, sched = _pair()
    offload = OffloadConfig("cpu") if device == "cpu" else OffloadConfig("nvme", tmp_path)
    model, sharded = memopt.shard(model, opt, stage=2, offload=offload)
    assert isinstance(sharded.inner, OffloadedAdamW)
    with warnings.catch_warnings():  # the scheduler knows its optimizer stepped
        warnings.filterwarnings("error", message=".*before `optimizer.step\\(\\)`")
        _train(model, sharded, sched, edit=True)
    # old code: 0.01 (the initial LR) in the stepping optimizer, 0.048 off torch
    assert sharded.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.01 * 0.5**8
    assert sharded.param_groups[0]["betas"] == (0.5, 0.9)
    gap = _gap(model, ref)
    assert gap <= 1e-6, f"the offloaded run differs from torch AdamW by {gap:.3g}"
    sd = sharded.state_dict()  # the shared groups save and load as before
    assert sd["param_groups"][0]["lr"] == sharded.param_groups[0]["lr"]
    assert sd["param_groups"][0]["betas"] == (0.5, 0.9)
    assert sd["state"][0]["master"].dtype == torch.float32
    sharded.param_groups[0]["lr"] = 1.0
    sharded.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.01 * 0.5**8  # the scheduler's optimizer sees it
    assert [p["held"] for p in sharded.checkpoint_layout()["params"]] == [True] * 6
    sharded.close()


def test_bad_hyperparameter_names_its_group() -> None:
    model = _model()
    opt = torch.optim.AdamW(
        [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    )
    opt.param_groups[1]["eps"] = float("nan")
    with pytest.raises(ValueError, match=r"memopt.shard\(offload=...\): param group 1: eps"):
        memopt.shard(model, opt, stage=2, offload="cpu")


def _accelerate(rank: int, world: int) -> dict[str, float]:
    from accelerate import Accelerator

    from memopt.integrations.accelerate import prepare

    ref, ref_opt, ref_sched = _pair()
    _train(ref, ref_opt, ref_sched, edit=False)
    model, opt, sched = _pair()
    acc = Accelerator(cpu=True)
    model, popt, psched = prepare(acc, model, opt, sched, stage=2, offload="cpu")
    for x, y in _batches():
        popt.zero_grad()
        acc.backward(nn.functional.mse_loss(model(x), y))
        popt.step()
        psched.step()
    return {"lr": popt.optimizer.param_groups[0]["lr"], "gap": _gap(model, ref)}


def test_accelerate_prepare_keeps_the_scheduler_with_offload() -> None:
    pytest.importorskip("accelerate")
    out = run_distributed(_accelerate, world_size=1, timeout_s=120)[0]
    assert out["lr"] == 0.01 * 0.5**8, out  # old code: 0.01
    assert out["gap"] <= 1e-6, out  # old code: 0.048


def _fail_on_one_rank(rank: int, world: int, tmp: str) -> list[str]:
    """Stage 2, NVMe: rank 0's tier has no room past its live state (ENOSPC in the step).
    Stage 1, CPU: rank 1's inner step raises a ValueError."""
    out = []
    for stage in (2, 1):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)])
        if stage == 2:
            live = 2 * 3 * 64 * 64 * 4  # two whole parameters per rank, fp32 master + moments
            cap = live + (4096 if rank == 0 else 1 << 20)
            nvme = NVMeConfig(directory=f"{tmp}/r{rank}", capacity_bytes=cap, grow_bytes=0)
            offload = OffloadConfig("nvme", nvme=nvme, bucket_bytes=16 << 10)
        else:
            offload = OffloadConfig("cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, sharded = memopt.shard(model, opt, stage=stage, offload=offload)
        if stage == 1 and rank == 1:

            def bad_step(*_: Any) -> None:
                raise ValueError("injected: a parameter the pipeline refuses")

            sharded.inner.step = bad_step
        try:
            sharded.zero_grad()
            model(torch.randn(4, 64)).pow(2).mean().backward()
            sharded.step()  # old code: the healthy rank waits in the gather (the timeout)
            out.append("no error")
        except Exception as e:  # noqa: BLE001 - reported to the test
            out.append(f"{type(e).__name__}: {e} | notes: {getattr(e, '__notes__', [])}")
        sharded.close()
    return out


def test_tier_error_on_one_rank_fails_every_rank(tmp_path: Path) -> None:
    r0, r1 = run_distributed(_fail_on_one_rank, 2, timeout_s=30, args=(str(tmp_path),))
    assert r0[0].startswith(f"OSError: [Errno {errno.ENOSPC}] NVMe tier file"), r0[0]
    assert "is full" in r0[0], r0[0]
    if sys.version_info >= (3, 11):  # (exception notes)
        assert "every rank raises" in r0[0] and "do not retry the step" in r0[0], r0[0]
    for msg, kind, failed, what in ((r1[0], "RuntimeError", 0, "OSError: [Errno 28]"),
                                    (r0[1], "ValueError", 1, "ValueError: injected")):  # fmt: skip
        assert msg.startswith(f"{kind}: memopt.shard: rank(s) [{failed}] failed in"), msg
        assert f"rank {failed}: {what}" in msg, msg
        assert "This rank's step completed" in msg and "reload model and optimizer" in msg, msg
    assert r1[1].startswith("ValueError: injected"), r1[1]


def _no_stale_masters(rank: int, world: int, layout: str) -> int:
    from memopt.offload.adamw_checks import signature

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, sharded = memopt.shard(model, opt, stage=2, layout=layout, offload="cpu")
    inner = sharded.inner
    assert isinstance(inner, OffloadedAdamW)
    try:
        for x, y in _batches(3):
            sharded.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            sharded.step()
            # the gather rewrote every shard, this rank's with the values its step wrote: the
            # next step must not take them for outside edits (a master rebuild per step)
            stale = [tuple(p.shape) for p, sig in inner._signatures.items() if sig != signature(p)]
            assert not stale, stale
        return len(inner._signatures)
    finally:
        sharded.close()


def test_the_gather_is_not_taken_for_an_outside_edit() -> None:
    # (the shards are views through .data: the gather's writes move the parameters' own
    # version counters, not theirs)
    counts = run_distributed(_no_stale_masters, world_size=2, timeout_s=60, args=("dim0",))
    assert all(n > 0 for n in counts)
