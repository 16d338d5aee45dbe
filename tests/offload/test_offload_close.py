"""Closing offload objects: use after close() names what was closed, and an NVMe tier (or
``OffloadedAdamW``) garbage-collected without close() stops its I/O threads, not only
removes its swap file."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
import torch

from memopt.offload import OffloadConfig, OffloadedAdamW
from memopt.offload.native_aio import NativeAIOBackend, native_available
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier


@pytest.fixture(params=["native", "threads"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native" and not native_available():
        pytest.skip("native AIO library not built")
    monkeypatch.setenv("MEMOPT_AIO", request.param)
    return request.param


def _nvme(tmp_path: Path) -> NVMeConfig:
    return NVMeConfig(directory=tmp_path, capacity_bytes=1 << 20, block_size=64 << 10,
                      queue_depth=2, direct="prefer", rank=0)  # fmt: skip


def _io_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("memopt-aio", "memopt-io"))}


def _optimizer(tmp_path: Path) -> tuple[torch.nn.Module, OffloadedAdamW]:
    model = torch.nn.Linear(32, 32)
    opt = OffloadedAdamW(model.parameters(), offload=OffloadConfig("nvme", nvme=_nvme(tmp_path)))
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_used_after_close_says_so(tmp_path: Path, kind: str) -> None:
    model, opt = _optimizer(tmp_path)
    opt.close()
    opt.close()  # twice: nothing
    for use in (opt.step, opt.state_dict, lambda: opt.read_state(model.weight)):
        with pytest.raises(RuntimeError, match="OffloadedAdamW was closed"):
            use()


def test_tier_used_after_close_says_so(tmp_path: Path, kind: str) -> None:
    tier = NVMeTier(_nvme(tmp_path))
    h = tier.allocate((16,), torch.float32)
    tier.close()
    tier.close()
    for use in (
        lambda: tier.allocate(4096),
        lambda: tier.write_async(h, torch.zeros(16)),
        lambda: tier.read_async(h, torch.empty(16)),
    ):
        with pytest.raises(RuntimeError, match=r"NVMe tier \(.*\) was closed"):
            use()


@pytest.mark.parametrize("what", ["tier", "optimizer"])
def test_dropped_without_close_stops_its_threads(tmp_path: Path, kind: str, what: str) -> None:
    before = _io_threads()
    if what == "tier":
        obj: object = NVMeTier(_nvme(tmp_path))
        h = obj.allocate((1024,), torch.float32)  # type: ignore[attr-defined]
        obj.write_async(h, torch.ones(1024)).wait()  # type: ignore[attr-defined]
        del h
    else:
        obj = _optimizer(tmp_path)[1]
    assert _io_threads() - before
    del obj
    gc.collect()
    for t in _io_threads() - before:
        t.join(10)
    assert not _io_threads() - before
    assert not any(tmp_path.iterdir())  # and the swap file is gone, as before


def test_native_backend_closed_from_its_own_reaper(tmp_path: Path) -> None:
    """A finalizer may run on the reaper thread (a garbage collection there): close() from
    that thread must not try to join itself, and the engine is still released."""
    if not native_available():
        pytest.skip("native AIO library not built")
    backend = NativeAIOBackend(queue_depth=2, block_size=4096)
    engine = backend._engines[0]
    outcome, errors, where = engine._outcome, [], []

    def close_here(*args: object) -> object:  # runs on the reaper thread, for each request
        where.append(threading.current_thread())
        try:
            backend.close()
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)
        return outcome(*args)

    engine._outcome = close_here  # type: ignore[method-assign]
    buf = torch.zeros(1024)
    with (tmp_path / "f").open("w+b") as f:
        f.write(b"\0" * 4096)
        f.flush()
        (fut,) = backend.submit("read", f.fileno(), buf.data_ptr(), 4096, 0, "test read")
        fut.result(10)
        engine._reaper.join(10)
    assert where == [engine._reaper] and not errors, errors
    assert not engine._reaper.is_alive() and engine._engine is None
