"""The shared activation types: policy validation, plan table, ledger counting."""

from __future__ import annotations

import gc

import pytest
import torch

from memopt.activations import ActivationPolicy, BlockDecision, Plan, SavedLedger
from memopt.activations.policy import recompute, split, swap


def test_policy_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="action"):
        ActivationPolicy("offload")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="swap_fraction"):
        split(1.5)
    with pytest.raises(ValueError, match="keep_ops"):
        ActivationPolicy("swap", keep_ops=("aten.mm",))
    assert recompute(("aten.mm",)).describe() == "recompute[keep aten.mm]"


def test_plan_table_lists_every_block() -> None:
    plan = Plan(
        decisions=(BlockDecision("layers.0", swap(), 0, 0, 1e-3),
                   BlockDecision("layers.1", recompute(), 1 << 20, 4 << 20, 2e-3)),
        budget_bytes=8 << 20, unmanaged_peak_bytes=16 << 20, predicted_peak_bytes=6 << 20,
        baseline_step_s=0.1, predicted_step_s=0.103,
    )
    text = plan.table()
    assert "layers.0" in text and "swap(cpu)" in text and "recompute" in text
    assert "budget 8.00 MiB" in text
    assert plan.policies()["layers.1"].action == "recompute"


def test_ledger_counts_storage_once_and_frees_on_gc() -> None:
    ledger = SavedLedger()
    x = torch.zeros(256)  # 1 KiB
    a = ledger.hold(x, block="b0")
    b = ledger.hold(x[10:20], block="b0")  # a view: same storage, not counted twice
    y = ledger.hold(torch.zeros(128), place="host", block="b1")
    assert ledger.current() == 1024 and ledger.current("host") == 512
    del a
    assert ledger.current() == 1024  # the view still holds it
    b.release()
    b.release()  # idempotent
    assert ledger.current() == 0 and ledger.peak() == 1024
    del y
    gc.collect()
    assert ledger.current("host") == 0
    ledger.reset_peak()
    assert ledger.peak() == 0
    assert ledger.block_peaks() == {"b0": 0}
