"""``StateOffloadedOptimizer`` when a tier read or write fails or is interrupted.

A read that fails (EIO) or is interrupted (Ctrl-C) changes nothing: the tier's copy and the
placeholder stay, ``state_dict()`` returns the good state and a retried step equals an
uninterrupted run. (The store used to mark the state resident before the read finished:
uninitialised moments, or a 0-element placeholder that broke every later step.)
"""

from __future__ import annotations

import copy
import errno
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import memopt.optim as mo
from memopt.offload import io_backend
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.state_offload import StateOffloadedOptimizer
from memopt.offload.tier import IOFuture

STEPS = 3


@pytest.fixture(autouse=True)
def _thread_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMOPT_AIO", "threads")  # failures are injected at its os calls


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))


def _grads(m: nn.Module, i: int) -> None:
    m.zero_grad()
    m(torch.randn(8, 64, generator=torch.Generator().manual_seed(i))).square().mean().backward()


def _reference() -> tuple[nn.Module, dict[str, Any]]:
    m = _model()
    opt = mo.AdamW(m.parameters(), lr=1e-2)  # offloading it is bit-exact (test_state_offload)
    for i in range(STEPS):
        _grads(m, i)
        opt.step()
    return m, opt.state_dict()


def _offloaded(tmp_path: Path) -> tuple[nn.Module, StateOffloadedOptimizer, NVMeTier]:
    m = _model()
    tier = NVMeTier(NVMeConfig(directory=tmp_path, capacity_bytes=1 << 20, rank=0))
    opt = StateOffloadedOptimizer(mo.AdamW(m.parameters(), lr=1e-2), tier)
    for i in range(STEPS - 1):
        _grads(m, i)
        opt.step()
    _grads(m, STEPS - 1)
    return m, opt, tier


def _same_state(sd: dict[str, Any], ref_sd: dict[str, Any], params: Any = None) -> None:
    for i, st in ref_sd["state"].items():
        if params is None or i in params:
            for k, v in st.items():
                got = sd["state"][i][k]
                assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v, (i, k)


def _assert_same(m: nn.Module, sd: dict[str, Any], ref: nn.Module, ref_sd: dict[str, Any]):
    for a, b in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    _same_state(sd, ref_sd)


@pytest.mark.parametrize("failing_read", [2, 3])
def test_failed_read_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_read: int
) -> None:
    """EIO on one read: read 2 is the first parameter's (nothing was updated: the step is
    retried), read 3 the third's (two were updated: the step is skipped)."""
    ref, ref_sd = _reference()
    m, opt, tier = _offloaded(tmp_path)
    before = copy.deepcopy(opt.state_dict())
    real, calls = io_backend._preadv, itertools.count(1)

    def eio(fd: int, bufs: list, off: int) -> int:
        if next(calls) == failing_read:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, bufs, off)

    monkeypatch.setattr(io_backend, "_preadv", eio)
    with pytest.raises(OSError, match="did not complete") as info:
        opt.step()
    monkeypatch.setattr(io_backend, "_preadv", real)
    assert info.value.errno == errno.EIO
    sd = opt.state_dict()
    if failing_read == 2:
        assert "can be retried" in str(info.value)
        _same_state(sd, before)  # nothing moved: the state is the good one
        opt.step()
        _assert_same(m, opt.state_dict(), ref, ref_sd)
    else:
        assert "2 of 4 parameters were updated" in str(info.value)
        _same_state(sd, before, params=(2, 3))  # not updated: exactly the state before
        _grads(m, STEPS)
        opt.step()
        assert all(torch.isfinite(p).all() for p in m.parameters())
    opt.close()
    tier.close()


@pytest.mark.parametrize("where", ["issue", "wait"])
def test_interrupted_read_leaves_usable_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Ctrl-C while a read is issued or waited on: state_dict() has the full state and the
    retried step equals an uninterrupted run (no 0-element placeholder left behind)."""
    ref, ref_sd = _reference()
    m, opt, tier = _offloaded(tmp_path)
    calls = itertools.count(1)
    if where == "issue":
        real_read = tier.read_async

        def read_async(handle: Any, out: torch.Tensor) -> IOFuture:
            if next(calls) == 2:
                raise KeyboardInterrupt
            return real_read(handle, out)

        monkeypatch.setattr(tier, "read_async", read_async)
    else:
        real_wait = IOFuture.wait

        def wait(self: IOFuture, timeout: float | None = None) -> None:
            if next(calls) == 2:
                raise KeyboardInterrupt
            real_wait(self, timeout)

        monkeypatch.setattr(IOFuture, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    monkeypatch.undo()
    sd = opt.state_dict()
    assert all(t.numel() > 1 for st in sd["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))  # fmt: skip
    opt.step()
    _assert_same(m, opt.state_dict(), ref, ref_sd)
    opt.close()
    tier.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["enospc", "eio"])
def test_failed_write_says_not_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    m, opt, tier = _offloaded(tmp_path)
    real, calls = io_backend._pwrite, itertools.count(1)

    def failing(fd: int, buf: memoryview, off: int) -> int:
        if next(calls) == 2:
            raise OSError(code, os.strerror(code))
        return real(fd, buf, off)

    monkeypatch.setattr(io_backend, "_pwrite", failing)
    with pytest.raises(OSError, match="Do not retry the step: reload model and optimizer") as e:
        opt.step()
    assert e.value.errno == code
    # "once the tier has room" only for a full disk (an EIO said it too)
    assert ("once the tier has room" in str(e.value)) == (code == errno.ENOSPC), str(e.value)
    monkeypatch.setattr(io_backend, "_pwrite", real)
    opt.close()
    tier.close()


def test_use_after_close_says_closed(tmp_path: Path) -> None:
    m, opt, tier = _offloaded(tmp_path)
    opt.close()
    opt.close()  # twice: nothing
    for use in (opt.step, opt.state_dict, opt.fetch_all):
        with pytest.raises(RuntimeError, match="StateOffloadedOptimizer was closed"):
            use()
    tier.close()
