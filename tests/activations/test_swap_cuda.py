"""Swap on a CUDA device: bit-identical gradients, allocator peak lower, slots and streams clean.

Skipped without CUDA (the ``gpu`` marker). On a GPU this exercises the side-stream copies,
event-gated frees, prefetch on the side stream and ``record_stream`` that the CPU tests cannot.
"""

from __future__ import annotations

import gc

import pytest
import torch

from memopt.activations import ActivationOptions, SavedLedger, apply
from memopt.activations.policy import keep, swap
from tests.activations._models import make_stack

pytestmark = pytest.mark.gpu


def _step(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    torch.cuda.synchronize()
    return [p.grad.clone() for p in model.parameters()]


def test_cuda_swap_bit_identical_and_lower_allocator_peak() -> None:
    model = make_stack(width=1024, depth=6).cuda()
    x = torch.randn(2048, 1024, device="cuda")
    names = [f"blocks.{i}" for i in range(6)]
    ref = _step(model, x)

    kept = apply(model, {n: keep() for n in names})
    torch.cuda.reset_peak_memory_stats()
    _step(model, x)
    keep_peak = torch.cuda.max_memory_allocated()
    kept.remove()

    ledger = SavedLedger()
    mgr = apply(model, {n: swap() for n in names}, ledger=ledger, options=ActivationOptions())
    for _ in range(3):  # repeated steps: slots reused, no stale data
        torch.cuda.reset_peak_memory_stats()
        got = _step(model, x)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    swap_peak = torch.cuda.max_memory_allocated()
    gc.collect()
    mgr.swap.reap()
    assert mgr.swap.pool.live_slots() == 0
    assert mgr.scheduler.prefetches >= 5
    assert ledger.peak("host") > 0
    # six blocks of saved activations (about 6 x 3 x 8 MiB) mostly leave the device
    assert swap_peak < keep_peak - 40 * 2**20, (swap_peak, keep_peak)
    mgr.remove()
