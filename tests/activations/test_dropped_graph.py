"""A graph dropped without a backward gives back its swap sources, slots and ledger bytes.

An exception between forward and backward (a caught OOM followed by an evaluation, a skipped
batch) drops the graph while copies out may still be in flight. Their device sources and the
slots of the released records used to wait for ``SwapEngine.reap()``, which only a
grad-enabled managed forward called: a ``no_grad`` evaluation never did, so one forward's worth
of activations stayed on the device and in the NVMe file, and the ledger counted them.

NVMe: the writes are held back by a gate until the graph is gone, then finish on their own;
the done-callbacks free everything with no forward at all. CPU tier with copies that report
completion only when polled (a CUDA event): freed at the release when the copies are done,
else by the next managed forward, with or without grad.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import time

import torch

from memopt.activations import ActivationOptions, SavedLedger, apply
from memopt.activations.policy import swap
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.tier import IOFuture
from tests.activations._models import make_stack, stack_loss
from tests.activations.test_swap_async import _SlowBackend


def _settled(mgr, ledger: SavedLedger, arena: PinnedArena) -> bool:  # type: ignore[no-untyped-def]
    nvme = mgr.swap.pool.nvme
    return (
        mgr.swap.pool.live_slots() == 0
        and ledger.current("device") == ledger.current("host") == ledger.current("nvme") == 0
        and arena.report().live_handles == 0
        and (nvme is None or nvme.report().live_handles == 0)
        and not mgr.swap._inflight
        and not mgr.swap._deferred
    )


def test_nvme_writes_finishing_after_the_drop_free_everything(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from memopt.offload.nvme_file import NVMeConfig

    model = make_stack(depth=3)
    ledger = SavedLedger()
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    cfg = NVMeConfig(tmp_path, capacity_bytes=1 << 20, grow_bytes=1 << 20, direct="prefer")
    opts = ActivationOptions(min_swap_bytes=1024, nvme=cfg)
    plan = {"blocks.0": swap("nvme"), "blocks.1": swap("nvme")}
    mgr = apply(model, plan, ledger=ledger, arena=arena, options=opts)
    tier = mgr.swap._nvme()
    gate, pool = threading.Event(), cf.ThreadPoolExecutor(1)
    real_write = tier.write_async

    def gated_write(handle, tensor):  # type: ignore[no-untyped-def]
        real = real_write(handle, tensor)  # the bytes go out now; completion waits for the gate
        return IOFuture([pool.submit(lambda: (gate.wait(30), real.wait()))], "gated write")

    tier.write_async = gated_write  # type: ignore[method-assign]
    try:
        loss = stack_loss(torch.randn(32, 64))(model)
        swapped = mgr.swap.stats["swapped"]
        assert swapped > 0 and ledger.current("nvme") > 0 and len(mgr.swap._inflight) == swapped
        del loss
        gc.collect()
        # released, but every write is still in flight: sources and slots are kept
        assert mgr.swap.pool.live_slots() == swapped and ledger.current("device") > 0
        gate.set()
        deadline = time.monotonic() + 10
        while not _settled(mgr, ledger, arena) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _settled(mgr, ledger, arena), (
            mgr.swap.pool.live_slots(), ledger.current("device"), ledger.current("nvme"),
            len(mgr.swap._inflight), len(mgr.swap._deferred),
        )
    finally:
        gate.set()
        pool.shutdown(wait=True)
        mgr.remove()
    assert arena.report().live_handles == 0


def _polled_manager():  # type: ignore[no-untyped-def]
    model = make_stack(depth=3)
    ledger = SavedLedger()
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    opts = ActivationOptions(min_swap_bytes=1024)
    plan = {"blocks.0": swap(), "blocks.1": swap()}
    mgr = apply(model, plan, ledger=ledger, arena=arena, options=opts)
    backend = mgr.swap.backend = _SlowBackend()
    return model, mgr, ledger, arena, backend


def test_cpu_tier_copies_done_before_the_drop_are_freed_by_the_release() -> None:
    model, mgr, ledger, arena, backend = _polled_manager()
    loss = stack_loss(torch.randn(32, 64))(model)
    assert mgr.swap._inflight and ledger.current("device") > 0
    for flag in backend.outs:  # the copies out complete, but nobody polls them
        flag.finished = True
    del loss
    gc.collect()
    assert _settled(mgr, ledger, arena)  # no forward ran since
    mgr.remove()


def test_cpu_tier_copies_done_after_the_drop_are_freed_by_a_no_grad_forward() -> None:
    model, mgr, ledger, arena, backend = _polled_manager()
    x = torch.randn(32, 64)
    loss = stack_loss(x)(model)
    del loss
    gc.collect()
    assert mgr.swap.pool.live_slots() > 0 and ledger.current("device") > 0  # still copying
    for flag in backend.outs:
        flag.finished = True
    with torch.no_grad():  # an evaluation: it polls the finished copies
        model(x)
    assert _settled(mgr, ledger, arena)
    mgr.remove()
