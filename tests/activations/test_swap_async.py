"""The asynchronous bookkeeping of swap (what CUDA streams exercise), driven on CPU.

A fake copy backend does each copy at once but reports it as still in flight until the test
says otherwise, the way a CUDA event reports a copy queued on the side stream. This checks the
parts the synchronous CPU path never reaches: a device source stays referenced (and counted)
until its copy out completes; a slot whose copy back is still in flight when autograd releases
it is freed only once that copy completes; ``close()`` waits for copies in flight.
"""

from __future__ import annotations

import gc

import torch

from memopt.activations import ActivationOptions, SavedLedger, apply
from memopt.activations.policy import swap
from memopt.activations.transfer import CopyBackend, Pending
from memopt.offload.arena import ArenaConfig, PinnedArena
from tests.activations._models import Flag as _Flag
from tests.activations._models import grads, make_stack, same, stack_loss


class _SlowBackend(CopyBackend):
    def __init__(self) -> None:
        super().__init__()
        self.outs: list[_Flag] = []
        self.ins: list[_Flag] = []

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> Pending:
        dst.copy_(src)
        return Pending(future=_Flag(self.outs))  # type: ignore[arg-type]

    def to_device(self, src: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Pending]:
        return src.clone(), Pending(future=_Flag(self.ins))  # type: ignore[arg-type]


def test_sources_held_until_copy_out_completes_and_deferred_frees() -> None:
    model = make_stack()
    x = torch.randn(32, 64)
    ref = grads(model, stack_loss(x))
    ledger = SavedLedger()
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    opts = ActivationOptions(min_swap_bytes=1024)
    mgr = apply(
        model, {f"blocks.{i}": swap() for i in range(4)}, ledger=ledger, arena=arena, options=opts
    )
    backend = mgr.swap.backend = _SlowBackend()
    model.zero_grad(set_to_none=True)
    loss = stack_loss(x)(model)
    # every copy out is "in flight": the device sources are still referenced and counted
    held = ledger.current("device")
    assert held > ledger.current("host") > 0
    assert len(mgr.swap._inflight) == len(backend.outs) > 0
    for flag in backend.outs[: len(backend.outs) // 2]:
        flag.finished = True
    mgr.swap.reap()
    assert 0 < ledger.current("device") < held  # the finished half is dropped, in order
    for flag in backend.outs:
        flag.finished = True
    mgr.swap.reap()
    small = 4 * 2 * 32 * 4  # LayerNorm mean and rstd per block: below min_swap_bytes, kept
    assert ledger.current("device") == small and not mgr.swap._inflight

    loss.backward()  # unpack waits on each copy back (wait() marks it finished)
    assert same([p.grad for p in model.parameters()], ref)
    gc.collect()
    assert mgr.swap.pool.live_slots() == 0 and arena.report().live_handles == 0
    mgr.remove()


def test_slot_freed_only_after_copy_back_completes() -> None:
    model = make_stack(depth=2)
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    mgr = apply(
        model, {"blocks.0": swap()}, arena=arena, options=ActivationOptions(min_swap_bytes=1024)
    )
    backend = mgr.swap.backend = _SlowBackend()
    loss = stack_loss(torch.randn(32, 64))(model)
    for flag in backend.outs:
        flag.finished = True
    records = list(mgr.swap._inflight)
    mgr.swap.reap()
    # start the copies back, then drop the graph before any is waited on (no backward)
    for record in records:
        record.prefetch()
    assert backend.ins and not any(f.finished for f in backend.ins)
    del loss
    gc.collect()
    # released by autograd, but the copies back still read the slots: not freed yet
    assert mgr.swap.pool.live_slots() == len(records) > 0
    for flag in backend.ins:
        flag.finished = True
    mgr.swap.reap()
    assert mgr.swap.pool.live_slots() == 0 and arena.report().live_handles == 0
    mgr.remove()
