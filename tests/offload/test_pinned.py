"""Pinned CPU tier: round trips, views, report, and the memlock fallback (warn once, no crash)."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from memopt._utils.logging import _reset_warn_once
from memopt.offload import hostmem
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.pinned_tier import PinnedCPUTier
from memopt.offload.tier import IOFuture, StorageTier

REPO = Path(__file__).resolve().parents[2]
CASES = [
    ((17,), torch.float32),
    ((3, 5, 7), torch.bfloat16),
    ((1000,), torch.float16),
    ((64, 65), torch.int64),
    ((5,), torch.uint8),
    ((0,), torch.float32),
]


@pytest.fixture
def tier() -> PinnedCPUTier:
    t = PinnedCPUTier(PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off")))
    yield t
    t.close()


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_round_trip(tier: PinnedCPUTier, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    src = (torch.randn(shape) * 100).to(dtype)
    h = tier.allocate(shape, dtype)
    assert isinstance(tier, StorageTier) and h.nbytes == src.numel() * src.element_size()
    tier.write_async(h, src).wait()
    assert torch.equal(tier.view(h), src)  # typed view into the arena, no copy
    out = torch.empty(shape, dtype=dtype)
    fut = tier.read_async(h, out)
    assert isinstance(fut, IOFuture)
    fut.wait()
    assert torch.equal(out, src)
    tier.free(h)


def test_report_and_errors(tier: PinnedCPUTier) -> None:
    h1 = tier.allocate(1000)
    h2 = tier.allocate((10, 10), torch.float64)
    rep = tier.report()
    assert (
        rep.requested_bytes == 1800 and rep.reserved_bytes == 1024 + 832 and rep.live_handles == 2
    )
    with pytest.raises(ValueError, match="holds 1000"):
        tier.write_async(h1, torch.zeros(10))
    with pytest.raises(ValueError, match="contiguous"):
        tier.write_async(h2, torch.zeros(10, 10, dtype=torch.float64).t())
    tier.free(h1)
    with pytest.raises(ValueError, match="not live"):
        tier.free(h1)
    with pytest.raises(ValueError, match="negative"):
        tier.allocate((-1, 3), torch.float32)


def test_mlock_pins_small_buffers() -> None:
    arena = PinnedArena(ArenaConfig(initial_bytes=64 * 1024, pin="auto"))
    if torch.cuda.is_available():
        assert arena.report().pinned_bytes == 64 * 1024
    elif hostmem._mlock is not None and hostmem.memlock_limit() >= 64 * 1024:
        assert arena.report().pinned_bytes == 64 * 1024
    arena.close()


def test_memlock_failure_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("with CUDA, pinning goes through cudaHostRegister, not mlock")
    monkeypatch.setattr(hostmem, "_mlock", lambda ptr, n: errno.ENOMEM)
    _reset_warn_once()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arena = PinnedArena(ArenaConfig(initial_bytes=1 << 20, chunk_bytes=1 << 20))
        arena.alloc(2 << 20)  # a second chunk: same message, not shown again
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "RLIMIT_MEMLOCK" in msgs[0] and "Falling back" in msgs[0]
    assert arena.report().pinned_bytes == 0 and arena.chunk_count() == 2
    with pytest.raises(OSError, match="mlock"):
        PinnedArena(ArenaConfig(initial_bytes=4096, pin="required"))


def _low_memlock() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
    if os.geteuid() == 0:  # root ignores the limit while it holds CAP_IPC_LOCK (14): drop it
        ctypes.CDLL(None).prctl(24, 14, 0, 0, 0)  # PR_CAPBSET_DROP; exec then loses it


def test_real_low_memlock_limit_in_subprocess() -> None:
    """A real RLIMIT_MEMLOCK of 64 KiB: a 1 MiB arena warns and works, unlocked."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA, pinning goes through cudaHostRegister, not mlock")
    code = (
        "import warnings, torch; warnings.simplefilter('always')\n"
        "from memopt.offload import PinnedCPUTier, PinnedArena, ArenaConfig\n"
        "t = PinnedCPUTier(PinnedArena(ArenaConfig(initial_bytes=1 << 20)))\n"
        "h = t.allocate((1000,), torch.float32); x = torch.randn(1000)\n"
        "t.write_async(h, x).wait(); assert torch.equal(t.view(h), x)\n"
        "print('pinned', t.report().pinned_bytes)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=_low_memlock, capture_output=True,
        text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    if "pinned 1048576" in res.stdout:
        pytest.skip("could not lower the memlock limit here (CAP_IPC_LOCK kept)")
    assert "pinned 0" in res.stdout
    assert res.stderr.count("RLIMIT_MEMLOCK is 65536 bytes") == 1, res.stderr
