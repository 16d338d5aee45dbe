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


class _TanhGate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x))  # tanh and sigmoid save their own outputs
        return y * torch.sigmoid(y.mean(-1, keepdim=True))


@pytest.mark.parametrize("action", ["keep", "swap"])
def test_graph_dropped_without_backward_is_freed(action: str) -> None:
    # A kept output held with its grad_fn made a cycle through C++ that gc cannot see: each
    # graph dropped without backward (an exception, a skipped batch) leaked, slots included.
    import weakref

    from memopt.activations import ActivationOptions, apply
    from memopt.activations.policy import keep

    torch.manual_seed(0)
    model = torch.nn.Sequential(_TanhGate(), _TanhGate())
    policy = keep() if action == "keep" else swap()
    mgr = apply(model, {"0": policy, "1": policy}, options=ActivationOptions(min_swap_bytes=4096))
    refs: list[weakref.ref] = []
    hook = model[0].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    for _ in range(3):
        loss = model(torch.randn(16, 64)).sum()
        del loss
    gc.collect()
    assert not any(r() is not None for r in refs)
    assert mgr.ledger.current("device") == 0 and mgr.ledger.current("host") == 0
    hook.remove()
    mgr.remove()
