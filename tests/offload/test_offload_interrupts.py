"""Ctrl-C (a real SIGINT, or a KeyboardInterrupt raised at the critical point) while offload
code registers I/O or builds state: nothing is left half done. A request is either handed to
the engine and awaited by close(), or was never registered; an interrupted first step of
``OffloadedAdamW`` leaves every parameter fresh or complete, and training goes on exactly as
if the interrupted step had not been tried."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from memopt.offload import OffloadedAdamW, pipeline
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.native_aio import NativeAIOBackend, _Request
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.pinned_tier import PinnedCPUTier
from memopt.offload.sigdefer import deferred_sigint
from memopt.offload.tier import StorageTier
from tests.offload.conftest import require_native


def _ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)  # handled by Python at its next check, as a Ctrl-C


def _finishes(fn: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Run ``fn`` on a helper thread; whether it returned within ``timeout`` (a hang fails the
    test instead of stopping the suite)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def _nvme(tmp_path: Path) -> NVMeConfig:
    return NVMeConfig(directory=tmp_path, capacity_bytes=1 << 20, block_size=64 << 10,
                      queue_depth=2, direct="prefer", rank=0)  # fmt: skip


def test_deferred_sigint_raises_after_the_block() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            _ctrl_c()
            done.append("rest of the block")  # not cut short
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with deferred_sigint():  # nothing pending: nothing raised
        pass


class _Lib:
    """The engine's C library, with a Ctrl-C at the start of each enqueue call."""

    def __init__(self, real: Any, interrupt: Callable[[], None]) -> None:
        self.real, self.interrupt = real, interrupt

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def memopt_aio_enqueue(self, *args: Any) -> None:
        self.interrupt()
        self.real.memopt_aio_enqueue(*args)


def _raise_ki() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt", [_ctrl_c, _raise_ki], ids=["sigint", "raised"])
def test_ctrl_c_while_enqueueing_never_strands_a_request(
    tmp_path: Path, interrupt: Callable[[], None]
) -> None:
    """A Ctrl-C between registering a request and enqueueing it left a tag the engine never
    saw: close() then waited for it forever."""
    require_native()
    backend = NativeAIOBackend(queue_depth=2, block_size=4096)
    engine = backend._engines[0]
    engine._lib = _Lib(engine._lib, interrupt)  # type: ignore[assignment]
    buf = torch.arange(1024, dtype=torch.float32)
    with (tmp_path / "f").open("w+b") as f:
        f.truncate(4096)
        with pytest.raises(KeyboardInterrupt):
            backend.submit("write", f.fileno(), buf.data_ptr(), 4096, 0, "test write")
        assert _finishes(backend.close), "close() hangs on a request the engine never saw"
        assert not engine._outstanding
    if interrupt is _ctrl_c:  # held back until the request was in: it was written
        assert (tmp_path / "f").read_bytes() == buf.numpy().tobytes()


def test_close_fails_a_request_never_handed_to_the_engine() -> None:
    """Whatever left one behind, close() does not wait for a request the engine never saw."""
    require_native()
    backend = NativeAIOBackend(queue_depth=2, block_size=4096)
    engine = backend._engines[0]
    fut: cf.Future[None] = cf.Future()
    with engine._lock:
        engine._outstanding[10**9] = _Request("write", "stranded write", fut)
        engine._lock.notify_all()
    assert _finishes(backend.close)
    with pytest.raises(RuntimeError, match="stranded write: never submitted"):
        fut.result(0)


def test_ctrl_c_inside_tier_write_keeps_the_write(tmp_path: Path, kind: str) -> None:
    """The tier registers, submits and tracks a request together: a Ctrl-C arriving
    meanwhile is raised after, the write is awaited by flush() and committed, and neither
    the shadow slot nor a bounce block is stranded."""
    tier = NVMeTier(_nvme(tmp_path))
    h = tier.allocate((1000,), torch.float32)  # 4000 bytes: a bounce block for the tail
    real = tier._submit

    def submit(*args: Any) -> list:
        _ctrl_c()
        return real(*args)

    tier._submit = submit  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        tier.write_async(h, torch.full((1000,), 7.0))
    tier._submit = real  # type: ignore[method-assign]
    assert _finishes(tier.flush)
    out = torch.empty(1000)
    tier.read_async(h, out).wait()
    assert torch.equal(out, torch.full((1000,), 7.0))
    report = tier.report()
    assert report.pinned_bytes == 0 and report.reserved_bytes == 4096, report
    assert _finishes(tier.close)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))


def _loss(model: torch.nn.Module, i: int) -> None:
    torch.manual_seed(100 + i)
    model(torch.randn(4, 32)).square().mean().backward()


def _first_step_interrupted(tier: StorageTier, arm: Callable[[Callable[[], None]], None]):
    """An OffloadedAdamW whose first step is interrupted by ``arm``'s hook, then three more
    steps; its parameters, and three steps of torch's AdamW from the same start."""
    model, ref = _model(), _model()
    opt = OffloadedAdamW(model.parameters(), lr=1e-2, tier=tier)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    calls = []

    def hook() -> None:
        calls.append(1)
        if len(calls) == 2:  # the second parameter's state: the first one is complete
            raise KeyboardInterrupt

    arm(hook)
    _loss(model, 0)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert len(calls) >= 2
    arm(lambda: None)
    opt.zero_grad()
    for i in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            _loss(m, i)
            o.step()
            o.zero_grad()
    assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == [3.0] * 4
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    opt.close()


def test_interrupted_first_step_on_nvme_recovers(tmp_path: Path, kind: str) -> None:
    tier = NVMeTier(_nvme(tmp_path))
    real = tier.write_async
    hook: list[Callable[[], None]] = [lambda: None]

    def write_async(handle: Any, tensor: torch.Tensor) -> Any:
        hook[0]()
        return real(handle, tensor)

    tier.write_async = write_async  # type: ignore[method-assign]
    _first_step_interrupted(tier, lambda fn: hook.__setitem__(0, fn))
    assert tier.report().live_handles == 0  # the interrupted parameter's chunks were freed
    tier.close()


def test_interrupted_first_step_on_cpu_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    arena = PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))
    tier = PinnedCPUTier(arena)
    real = pipeline._fill
    hook: list[Callable[[], None]] = [lambda: None]

    def fill(*args: Any) -> None:
        hook[0]()
        real(*args)

    monkeypatch.setattr(pipeline, "_fill", fill)
    _first_step_interrupted(tier, lambda fn: hook.__setitem__(0, fn))
    assert arena.report().live_handles == 0
