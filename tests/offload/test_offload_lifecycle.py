"""Offload objects over their whole life: dropped without close() they give the shared pinned
arena back what they held; copies are refused with a clear TypeError; and a process forked
from their owner can neither use them (a clear RuntimeError, not a hang) nor, on its way out,
remove the parent's swap file."""

from __future__ import annotations

import copy
import gc
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import memopt
from memopt.offload import ArenaConfig, OffloadConfig, OffloadedAdamW, PinnedArena, default_arena
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.pinned_tier import PinnedCPUTier
from memopt.offload.state_offload import StateOffloadedOptimizer
from memopt.optim import AdamW as MemoptAdamW
from tests._harness.fork import in_child


def _nvme(tmp_path: Path) -> NVMeConfig:
    return NVMeConfig(directory=tmp_path, capacity_bytes=1 << 20, block_size=64 << 10,
                      queue_depth=2, direct="prefer", rank=0)  # fmt: skip


def _offload(device: str, tmp_path: Path) -> OffloadConfig:
    if device == "cpu":
        return OffloadConfig("cpu")
    return OffloadConfig("nvme", nvme=_nvme(tmp_path), bucket_bytes=64 << 10)


def _held() -> tuple[int, int]:
    r = default_arena().report()
    return r.requested_bytes, r.live_handles


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(2, 64)).square().sum().backward()
    opt.step()
    opt.zero_grad()


# --- dropped without close() -------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_dropped_offloaded_adamw_gives_the_arena_back(tmp_path: Path, device: str) -> None:
    before = _held()
    for _ in range(3):  # a loop of trials that never call close()
        model = torch.nn.Linear(64, 64)
        opt = OffloadedAdamW(model.parameters(), offload=_offload(device, tmp_path))
        _train(model, opt)
        assert _held()[0] > before[0]  # state (cpu) or the staging ring (nvme) is in the arena
        del model, opt
        gc.collect()
        assert _held() == before
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["cpu", "nvme"])
@pytest.mark.parametrize(
    ("stage", "name"), [(2, "adamw"), (2, "adamw-int8"), (3, "adamw")]
)  # OffloadedAdamW, StateOffloadedOptimizer, stage 3's StateStore
def test_dropped_sharded_offload_frees_the_arena(
    tmp_path: Path, device: str, stage: int, name: str
) -> None:
    before = _held()
    model = torch.nn.Linear(64, 64)
    kw = {"state_dtype": "int8"} if name == "adamw-int8" else {}
    opt = MemoptAdamW(model.parameters(), lr=1e-3, **kw)
    model, sharded = memopt.shard(model, opt, stage=stage, offload=_offload(device, tmp_path))
    _train(model, sharded)
    del model, opt, sharded
    gc.collect()
    assert _held() == before


def test_dropped_pinned_tier_gives_its_blocks_back() -> None:
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    tier = PinnedCPUTier(arena)
    for _ in range(3):
        tier.allocate((1000,), torch.float32)
    assert arena.report().live_handles == 3
    del tier
    gc.collect()
    assert arena.report().requested_bytes == 0 and arena.report().live_handles == 0
    tier = PinnedCPUTier(arena)  # close() still frees at once, and the tier stays usable
    tier.allocate(100)
    tier.close()
    tier.allocate(100)
    assert arena.report().live_handles == 1


def test_arena_release_never_waits_for_its_lock() -> None:
    """A finalizer can run inside another arena call on the same thread (a garbage collection
    there), lock held: release() must not deadlock; the blocks are freed by the next call."""
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    blocks = [arena.alloc(4096) for _ in range(2)]
    with arena._lock:  # as if inside arena.alloc
        arena.release(blocks)
    assert arena.report().live_handles == 0 and arena.report().requested_bytes == 0
    arena.release([arena.alloc(64)])  # lock free: freed at once
    assert arena._released == [] and arena.report().live_handles == 0


# --- copies ------------------------------------------------------------------------------


def _state_offloaded() -> StateOffloadedOptimizer:
    model = torch.nn.Linear(64, 64)
    opt = StateOffloadedOptimizer(MemoptAdamW(model.parameters()), PinnedCPUTier(), min_bytes=0)
    _train(model, opt)
    return opt


def _offloaded() -> OffloadedAdamW:
    model = torch.nn.Linear(64, 64)
    opt = OffloadedAdamW(model.parameters(), offload=OffloadConfig("cpu"))
    _train(model, opt)
    return opt


@pytest.mark.parametrize("make", [_offloaded, _state_offloaded], ids=["adamw", "state"])
@pytest.mark.parametrize("how", [copy.deepcopy, copy.copy, pickle.dumps])
def test_copies_are_refused_with_the_way_out(make: Callable, how: Callable) -> None:
    opt = make()
    with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\)"):
        how(opt)
    opt.close()


# --- os.fork -----------------------------------------------------------------------------


def test_forked_child_neither_uses_nor_removes_the_parents_tier(tmp_path: Path) -> None:
    tier = NVMeTier(_nvme(tmp_path))
    h = tier.allocate((1024,), torch.float32)
    tier.write_async(h, torch.full((1024,), 3.0)).wait()
    buf = torch.empty(1024)
    swap = tier.file.path

    def child() -> str:
        try:
            tier.read_async(h, buf)  # (not waited for: the old code hung there)
            said = "read started"
        except RuntimeError as e:
            said = str(e)
        tier._finalizer()  # what a garbage collection or the child's exit runs
        tier.close()  # quietly: the child's copy only
        return said

    said = in_child(tmp_path, child)
    assert swap.exists()  # the child did not remove the parent's file
    assert "inherited by fork" in said and "make a new one" in said.lower(), said
    tier.read_async(h, buf).wait()  # and the parent goes on
    assert torch.equal(buf, torch.full((1024,), 3.0))
    tier.close()
    assert not swap.exists()


def test_forked_child_refuses_an_inherited_offloaded_optimizer(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    opt = OffloadedAdamW(model.parameters(), offload=_offload("nvme", tmp_path))
    _train(model, opt)
    model(torch.randn(2, 64)).square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]

    def child() -> str:
        try:
            opt.step()
            return "stepped"
        except RuntimeError as e:
            said = str(e)
        opt.close()
        return said

    said = in_child(tmp_path, child)
    assert "inherited by fork" in said, said
    assert list(tmp_path.iterdir())  # the parent's swap file is still there
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(s["step"] == 2 for s in opt.state.values())
    opt.close()
    assert not any(tmp_path.iterdir())


def test_fork_while_another_thread_is_inside_an_arena_call(tmp_path: Path) -> None:
    """DataLoader workers fork while the training thread may be allocating: the child's
    arena must not inherit a held lock (it hung on its first allocation)."""
    import threading
    import time

    arena = PinnedArena(ArenaConfig(initial_bytes=1 << 16, chunk_bytes=1 << 16, pin="off"))
    inside = threading.Event()

    def busy() -> None:
        with arena._lock:  # stands for an alloc/free that is mid-way at the fork
            inside.set()
            time.sleep(0.3)

    t = threading.Thread(target=busy)
    t.start()
    inside.wait()

    def child() -> str:
        block = arena.alloc(4096)
        arena.free(block)
        return "allocated"

    said = in_child(tmp_path, child, timeout_s=5.0)
    t.join()
    assert said == "allocated", said
    arena.free(arena.alloc(4096))  # the parent's lock was handed back too
    arena.close()
