"""A split block's predicted bytes against the ledger, and what the report's columns mean.

The report used to set a block's *held* prediction (forward to backward) beside its measured
device peak over the whole step, which for a swap or split block is reached in its own
backward, when its swapped bytes are back on the device: a split(0.75) LLaMA layer read
"predicted 0.08, device 1.24". And the planner priced a split's swapped part as alpha of
its saves, while the split swaps the attention core whole: 14-23% too few fetched-back bytes.
"""

from __future__ import annotations

import pytest
import torch

import memopt.activations as act
from memopt.activations.costmodel import Window, option_for
from tests.activations._models import profiled_llama

transformers = pytest.importorskip("transformers")

MIB = 2.0**20


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, dict[str, torch.Tensor], act.Profile]:
    return profiled_llama(hidden=128, intermediate=384, layers=2, vocab=500, max_positions=128,
                          batch=2, seq=64, ops=False)  # fmt: skip


def _split_run(model, batch, name, alpha):  # type: ignore[no-untyped-def]
    """(device bytes after the forward, host bytes after it, device peak over the step)."""
    pol = act.ActivationPolicy("split", swap_fraction=alpha)
    with act.apply(model, {name: pol}) as manager:
        loss = model(**batch).loss
        held, host = manager.ledger.current("device"), manager.ledger.current("host")
        loss.backward()
        model.zero_grad(set_to_none=True)
        peak = manager.ledger.block_peaks("device")[name]
    return held, host, peak


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_split_swapped_bytes_are_priced(llama, alpha) -> None:  # type: ignore[no-untyped-def]
    """The bytes a split sends to the tier (and fetches back for its backward) match the
    cost model's prefetch; the block's device peak matches held + fetched back."""
    model, batch, prof = llama
    block = prof.blocks[1]
    pol = act.ActivationPolicy("split", swap_fraction=alpha)
    opt = option_for(pol, block, prof, Window(0.0, 0.0))
    held, host, peak = _split_run(model, batch, block.name, alpha)
    assert abs(host - opt.prefetch) <= 0.05 * host, (host, opt.prefetch)
    assert abs(peak - (opt.held + opt.ledger_transient)) <= 0.05 * peak
    # (the swapped part's saves below min_swap_bytes stay on the device, unpriced)
    assert abs(held - opt.held) <= block.small_saved_bytes + 0.01 * held
    assert block.split_core_bytes > 0  # the attention core was seen


def test_report_sets_peak_against_peak(llama) -> None:  # type: ignore[no-untyped-def]
    """The report's row for a split block: predicted held beside the predicted peak, the
    latter within 5% of the measured device peak (which includes the fetched-back bytes)."""
    model, batch, prof = llama
    name = prof.blocks[1].name
    pol = act.ActivationPolicy("split", swap_fraction=0.75)
    plan = act.plan(model, batch, "100%", profile=prof, overrides={name: pol})
    decision = next(d for d in plan.decisions if d.name == name)
    with act.apply(model, plan) as manager:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        text = manager.report(plan)
    print(text)
    assert "pred held" in text.splitlines()[0] and "pred peak" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith(name)).split()
    pred_held, pred_peak, dev_peak, host_peak = map(float, row[-5:-1])
    assert pred_held == pytest.approx(decision.held_bytes / MIB, abs=0.006)
    assert dev_peak > 3 * pred_held  # the fetched-back bytes are in the measured peak
    assert abs(pred_peak - dev_peak) <= 0.05 * dev_peak + 0.01
    assert host_peak > 0
    assert decision.ledger_peak_bytes / MIB == pytest.approx(pred_peak, abs=0.006)
