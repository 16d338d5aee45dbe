"""The hybrid scheduler wired into the offload step: each group runs on the CPU (native
kernel) or on the parameters' device (torch's fused AdamW after copying the state over), as
measured rates decide. Here the device is the CPU too, so both paths run for real; a slowed
path must lose its groups to the other within a few steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from memopt.offload import host_update, hybrid_update
from memopt.offload.hybrid import HybridPlan
from memopt.offload.hybrid_update import HybridUpdate
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.optimizer import OffloadConfig, OffloadedAdamW
from memopt.offload.pinned_tier import PinnedCPUTier
from tests.offload.test_offload_optim import _check_parity, _groups, _params, _run

HYBRID = OffloadConfig(bucket_bytes=8 << 10, hybrid=True)


class _Alternate(HybridUpdate):
    """Forces CPU / device alternately per group (both paths in every step)."""

    def begin_step(self, sizes: Any, costs: Any) -> None:
        super().begin_step(sizes, costs)
        where = tuple("device" if i % 2 else "cpu" for i in range(len(sizes)))
        self.plan = HybridPlan(where, {}, 0.0)  # type: ignore[arg-type]
        self.placements[-1] = where


@pytest.mark.parametrize("tier_kind", ["cpu", "nvme"])
def test_both_paths_equal_torch_adamw(tmp_path: Path, tier_kind: str) -> None:
    params = _params()
    tier = (PinnedCPUTier() if tier_kind == "cpu"
            else NVMeTier(NVMeConfig(directory=tmp_path, capacity_bytes=4 << 20)))  # fmt: skip
    opt = OffloadedAdamW(_groups(params), lr=1e-2, tier=tier, offload=HYBRID)
    opt.store.hybrid = _Alternate()
    _check_parity(opt, params)  # master, moments and parameters within 1e-6 of torch AdamW
    assert set(opt.store.hybrid.placements[-1]) == {"cpu", "device"}
    opt.close()


def test_bf16_parameters_on_the_device_path() -> None:
    params = _params(torch.bfloat16)
    ref = [p.detach().float().clone().requires_grad_() for p in params]
    opt = OffloadedAdamW(_groups(params), lr=1e-2, tier=PinnedCPUTier(), offload=HYBRID)
    opt.store.hybrid = _Alternate()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2)
    _run(opt, params, range(3), round_to=torch.bfloat16)
    _run(ref_opt, ref, range(3), round_to=torch.bfloat16)
    for p, r in zip(params, ref, strict=True):
        assert p.dtype == torch.bfloat16
        # the fp32 masters agree to ~1e-7, so a rounding to bf16 may differ by one bf16 ulp
        torch.testing.assert_close(
            p.float(), r.detach().to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6
        )
    opt.close()


def _slowed(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, delay: float) -> None:
    real = getattr(module, name)

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)


@pytest.mark.parametrize("slow", ["cpu", "device"])
def test_placement_follows_measured_rates(monkeypatch: pytest.MonkeyPatch, slow: str) -> None:
    if slow == "cpu":
        _slowed(monkeypatch, host_update, "cpu_adamw_step_", 0.02)
    else:
        _slowed(monkeypatch, hybrid_update.torch, "_fused_adamw_", 0.02)
    params = _params()
    opt = OffloadedAdamW(_groups(params), lr=1e-2, tier=PinnedCPUTier(), offload=HYBRID)
    _run(opt, params, range(8))
    hybrid = opt.store.hybrid
    assert hybrid is not None and hybrid.scheduler is not None
    rates = hybrid.scheduler.rates
    assert {"cpu", "device", "h2d", "d2h"} <= hybrid.scheduler._measured, "a path never ran"
    fast = "device" if slow == "cpu" else "cpu"
    assert all(w == fast for w in hybrid.placements[-1]), (hybrid.placements, rates)
    opt.close()


def test_hybrid_off_runs_everything_on_the_cpu() -> None:
    params = _params()
    opt = OffloadedAdamW(_groups(params), lr=1e-2, tier=PinnedCPUTier(),
                         offload=OffloadConfig(bucket_bytes=8 << 10))  # fmt: skip
    assert opt.store.hybrid is None
    _run(opt, params, range(2))
    opt.close()
