"""NVMe tier errors under swap("nvme"): nothing leaks, the error says what to do, and a bad
tier directory is refused by ``apply``.

Before: a swap refused at submit (a full tier file) kept its slot until ``remove()``; a
backward that failed on a swapped activation's write or read kept its whole graph alive (the
tier future re-raised its stored exception, whose traceback then held the backward's frames,
the loss and, through autograd's C++ nodes, every record), so each failed step left its slots,
file room, ledger bytes and device buffers behind; and an unwritable directory passed
``apply`` and failed inside the first forward's saved-tensor hook.
"""

from __future__ import annotations

import errno
import gc
import os
import time
from typing import Any

import pytest
import torch

import memopt.offload.io_backend as io_backend
from memopt.activations import ActivationOptions, SavedLedger, apply
from memopt.activations.policy import keep, swap
from memopt.activations.swaprecord import SwapRecord
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.nvme_file import NVMeConfig
from tests.activations._models import grads, make_stack, same, stack_loss

WIDTH, ROWS = 256, 64  # every swapped save is 64 KiB


def _manager(tmp_path: Any, **nvme: Any) -> tuple[Any, SavedLedger, torch.nn.Module]:
    model = make_stack(depth=4, width=WIDTH)
    ledger = SavedLedger()
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    cfg = NVMeConfig(tmp_path / "act", direct="prefer", **nvme)
    plan = {f"blocks.{i}": swap("nvme") for i in range(3)} | {"blocks.3": keep()}
    opts = ActivationOptions(min_swap_bytes=1024, nvme=cfg)
    return apply(model, plan, ledger=ledger, arena=arena, options=opts), ledger, model


def _left(mgr: Any, ledger: SavedLedger) -> tuple[int, ...]:
    """(live slots, tier handles, device / host / nvme ledger bytes, live records)."""
    gc.collect()
    tier = mgr.swap.pool.nvme
    records = sum(type(o) is SwapRecord for o in gc.get_objects())
    return (
        mgr.swap.pool.live_slots(),
        0 if tier is None else tier.report().live_handles,
        ledger.current("device"), ledger.current("host"), ledger.current("nvme"),
        records,
    )


def _settle(mgr: Any, ledger: SavedLedger) -> tuple[int, ...]:
    """What is left once the tier's I/O threads finished (they free released records)."""
    deadline = time.monotonic() + 10
    left = _left(mgr, ledger)
    while any(left) and time.monotonic() < deadline:
        time.sleep(0.02)
        left = _left(mgr, ledger)
    return left


def _failing(monkeypatch: pytest.MonkeyPatch, name: str) -> list[bool]:
    """Make the thread I/O backend's ``_pwrite``/``_preadv`` raise EIO while flag[0] is set."""
    real, flag = getattr(io_backend, name), [True]

    def io(*args: Any) -> int:
        if flag[0]:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(io_backend, name, io)
    return flag


def _step(model: torch.nn.Module, x: torch.Tensor) -> str:
    """One forward and backward that must fail with an OSError; its message."""
    try:
        model(x).pow(2).mean().backward()
    except OSError as err:
        return f"[{errno.errorcode.get(err.errno or 0)}] {err}"
    raise AssertionError("the step did not fail")


def test_swap_refused_at_submit_gives_its_slot_back(tmp_path: Any) -> None:
    mgr, ledger, model = _manager(tmp_path, capacity_bytes=5 * 65536, grow_bytes=0)
    x = torch.randn(ROWS, WIDTH)
    for _ in range(3):  # the 6th save finds the file full, every time
        assert "[ENOSPC]" in _step(model, x)
        assert _settle(mgr, ledger) == (0, 0, 0, 0, 0, 0)
    mgr.remove()


@pytest.mark.parametrize("op", ["write", "read"])
def test_backward_failing_on_tier_io_frees_the_graph(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    monkeypatch.setenv("MEMOPT_AIO", "threads")
    mgr, ledger, model = _manager(tmp_path, capacity_bytes=4 << 20)
    x = torch.randn(ROWS, WIDTH)
    flag = _failing(monkeypatch, "_pwrite" if op == "write" else "_preadv")
    for _ in range(2):  # before: 9 more records, slots and 576 KiB of file room per step
        msg = _step(model, x)
        assert _settle(mgr, ledger) == (0, 0, 0, 0, 0, 0), msg
        assert "[EIO]" in msg and "swapped activation of block 'blocks.2'" in msg, msg
        assert "zero_grad" in msg and "redo the forward" in msg, msg
    flag[0] = False  # the disk is back: the same manager trains as the unmanaged model does
    model.zero_grad(set_to_none=True)
    got = grads(model, stack_loss(x))
    mgr.remove()
    assert same(got, grads(model, stack_loss(x)))


@pytest.mark.parametrize("op", ["written to", "read back from"])
def test_a_failed_record_frees_its_slot_while_the_error_is_kept(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """A caller that keeps the exception (a log, a notebook's last error) keeps the graph; the
    record that saw the error still gives back its slot, its buffers and their ledger bytes,
    and raises the same error again at a later use (not a StaleSlotError about a freed slot)."""
    monkeypatch.setenv("MEMOPT_AIO", "threads")
    mgr, ledger, _model = _manager(tmp_path, capacity_bytes=1 << 20)
    engine = mgr.swap
    flag = _failing(monkeypatch, "_pwrite" if op == "written to" else "_preadv")
    flag[0] = op == "written to"
    record = engine.store(torch.randn(ROWS, WIDTH), "nvme", "blocks.1")
    record.retain()  # as a packed form in the graph does
    flag[0] = True
    match = rf"block 'blocks.1' \(65536 bytes\) could not be {op} the 'nvme' tier"
    with pytest.raises(OSError, match=match) as kept:
        record.materialize()
    assert kept.value.errno == errno.EIO
    tier = engine.pool.nvme
    left = (
        engine.pool.live_slots(), tier.report().live_handles,
        ledger.current("nvme"), ledger.current("device"),
    )  # fmt: skip
    assert left == (0, 0, 0, 0)
    with pytest.raises(OSError, match=match):
        record.prefetch()
    record.release()
    mgr.remove()


def test_apply_refuses_an_unusable_nvme_directory(tmp_path: Any) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    setting = r"ActivationOptions.nvme=NVMeConfig\(directory=.*"
    for bad, why in ((afile, "exists and is not a directory"), (afile / "act", "be created")):
        model = make_stack()
        opts = ActivationOptions(nvme=NVMeConfig(bad))
        with pytest.raises(NotADirectoryError, match=setting + why + ".*tier='cpu'"):
            apply(model, {"blocks.0": swap("nvme")}, options=opts)
        assert all("forward" not in b.__dict__ for b in model.blocks)  # nothing installed
    made = tmp_path / "new" / "act"
    opts = ActivationOptions(nvme=NVMeConfig(made))
    apply(make_stack(), {"blocks.0": swap("nvme")}, options=opts).remove()
    assert made.is_dir() and not os.listdir(made)  # created, and the probe file removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 directory")
def test_apply_refuses_a_read_only_nvme_directory(tmp_path: Any) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        opts = ActivationOptions(nvme=NVMeConfig(ro))
        with pytest.raises(PermissionError, match="does not let a file be created"):
            apply(make_stack(), {"blocks.0": swap("nvme")}, options=opts)
    finally:
        ro.chmod(0o755)
