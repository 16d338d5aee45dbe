"""Huge-page host buffers: real THP backing, alignment, fallback / required errors, and the
arena round-tripping data through the NVMe tier with huge pages on."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from memopt._utils.logging import _reset_warn_once
from memopt.offload import hostmem
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.hostmem import HostBuffer, anon_huge_bytes, huge_page_size, thp_mode
from memopt.offload.io_backend import ThreadPoolBackend
from memopt.offload.native_aio import NativeAIOBackend, native_available
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.tier import wait_all

HUGE = huge_page_size()
THP_ON = thp_mode() in ("always", "madvise")
needs_thp = pytest.mark.skipif(
    not THP_ON, reason=f"THP is {thp_mode()!r} in {hostmem.THP_ENABLED}: no huge pages to check"
)


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    _reset_warn_once()


@needs_thp
@pytest.mark.parametrize("pin", ["off", "auto"])
def test_huge_pages_back_the_buffer(pin: str) -> None:
    buf = HostBuffer(4 * HUGE, pin=pin, huge_pages="required")  # type: ignore[arg-type]
    assert buf.ptr % HUGE == 0
    assert buf.tensor.numel() == 4 * HUGE and buf.tensor.data_ptr() == buf.ptr
    assert buf.huge_bytes == 4 * HUGE
    assert anon_huge_bytes(buf.ptr, buf.nbytes) == 4 * HUGE  # read back independently
    buf.tensor[:: HUGE // 2] = 7  # usable memory
    assert int(buf.tensor[HUGE // 2]) == 7
    buf.release()


@needs_thp
def test_plain_buffer_is_not_huge_in_madvise_mode() -> None:
    if thp_mode() != "madvise":
        pytest.skip("THP 'always' backs every mapping: no contrast to check")
    buf = HostBuffer(4 * HUGE, pin="off")
    buf.tensor.fill_(1)
    assert anon_huge_bytes(buf.ptr, buf.nbytes) == 0


@needs_thp
def test_unpinned_auto_stays_lazy_and_gets_huge_pages_on_touch() -> None:
    buf = HostBuffer(2 * HUGE, pin="off", huge_pages="auto")
    assert buf.huge_bytes == 0  # nothing faulted in yet: no eager commit of the whole buffer
    assert anon_huge_bytes(buf.ptr, buf.nbytes) == 0
    buf.tensor.fill_(1)  # first touch
    assert anon_huge_bytes(buf.ptr, buf.nbytes) == 2 * HUGE


def test_default_arena_asks_for_huge_pages() -> None:
    from memopt.offload.arena import default_arena

    assert default_arena().config.huge_pages == "auto"


@needs_thp
def test_exact_size_and_partial_tail() -> None:
    nbytes = 2 * HUGE + 3 * hostmem.PAGE_SIZE
    buf = HostBuffer(nbytes, pin="off", huge_pages="required")
    assert buf.nbytes == nbytes and buf.tensor.numel() == nbytes
    assert buf.huge_bytes == 2 * HUGE  # the whole huge pages only; the tail stays 4 KiB


def test_thp_never_auto_warns_once_and_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "thp_mode", lambda: "never")
    with pytest.warns(RuntimeWarning, match="transparent_hugepage/enabled"):
        a = HostBuffer(HUGE, pin="off", huge_pages="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = HostBuffer(HUGE, pin="off", huge_pages="auto")  # second: silent
    for buf in (a, b):
        assert buf.huge_bytes == 0 and buf.ptr % HUGE == 0
        buf.tensor.fill_(3)
        assert int(buf.tensor.sum()) == 3 * HUGE


def test_thp_never_required_raises_naming_sysfs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "thp_mode", lambda: "never")
    with pytest.raises(OSError, match=r"'never'.*transparent_hugepage/enabled"):
        HostBuffer(HUGE, pin="off", huge_pages="required")


def test_madvise_refused_falls_back_or_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hostmem, "_madvise_huge", lambda m, off, n: 22)  # EINVAL
    with pytest.raises(OSError, match="MADV_HUGEPAGE.*EINVAL"):
        HostBuffer(HUGE, pin="off", huge_pages="required")
    with pytest.warns(RuntimeWarning, match="MADV_HUGEPAGE"):
        buf = HostBuffer(HUGE, pin="off", huge_pages="auto")
    assert buf.huge_bytes == 0


def test_kernel_backing_less_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hostmem, "anon_huge_bytes", lambda ptr, n: HUGE)
    with pytest.raises(OSError, match=f"backed {HUGE} of {2 * HUGE} bytes"):
        HostBuffer(2 * HUGE, pin="off", huge_pages="required")
    monkeypatch.setattr(hostmem, "_mlock", lambda ptr, n: 0)  # "pinned": pages are in
    with pytest.warns(RuntimeWarning, match="backed"):
        buf = HostBuffer(2 * HUGE, pin="required", huge_pages="auto")
    assert buf.huge_bytes == HUGE  # what the kernel gave, reported truthfully


def test_bad_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="huge_pages"):
        HostBuffer(HUGE, huge_pages="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ArenaConfig.huge_pages"):
        ArenaConfig(huge_pages="on")  # type: ignore[arg-type]


@needs_thp
def test_arena_rounds_chunks_and_reports_it() -> None:
    arena = PinnedArena(ArenaConfig(chunk_bytes=0, pin="off", huge_pages="required"))
    block = arena.alloc(HUGE + 100, alignment=4096)
    rep, huge = arena.report(), arena.huge_pages()
    assert rep.requested_bytes == HUGE + 100  # exact accounting of what was asked
    assert rep.capacity_bytes == 2 * HUGE  # the chunk, rounded to whole huge pages
    assert huge.rounding_bytes == 2 * HUGE - (HUGE + hostmem.PAGE_SIZE)
    assert huge.huge_bytes == 2 * HUGE and huge.mode == "required"
    arena.free(block)
    assert arena.trim() == 2 * HUGE and arena.huge_pages().rounding_bytes == 0
    arena.close()


def test_arena_without_thp_does_not_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "thp_mode", lambda: "never")
    from memopt.offload import arena as arena_mod

    monkeypatch.setattr(arena_mod, "thp_mode", lambda: "never")
    arena = PinnedArena(ArenaConfig(chunk_bytes=0, pin="off", huge_pages="auto"))
    with pytest.warns(RuntimeWarning):
        arena.alloc(HUGE + 100)
    assert arena.report().capacity_bytes == HUGE + hostmem.PAGE_SIZE
    assert arena.huge_pages().rounding_bytes == 0 and arena.huge_pages().huge_bytes == 0
    arena.close()


@pytest.mark.parametrize("kind", ["native", "threads"])
def test_nvme_round_trip_on_huge_page_arena(tmp_path: Path, kind: str) -> None:
    if kind == "native" and not native_available():
        pytest.skip("native AIO library not built")
    arena = PinnedArena(ArenaConfig(chunk_bytes=4 * HUGE, huge_pages="auto"))
    backend = NativeAIOBackend(4, 1 << 20) if kind == "native" else ThreadPoolBackend(4, 1 << 20)
    cfg = NVMeConfig(tmp_path, capacity_bytes=8 * HUGE, block_size=1 << 20, queue_depth=4)
    with NVMeTier(cfg, arena=arena, backend=backend) as tier:
        parts = [arena.tensor(arena.alloc(HUGE, alignment=4096)) for _ in range(2)]
        odd = torch.randn(333_333)  # not aligned, not in the arena: bounced
        for p in parts:
            p.random_(0, 255)
        handles = [tier.allocate(p.numel()) for p in parts] + [tier.allocate(odd.numel() * 4)]
        srcs = [*parts, odd.view(torch.uint8)]
        wait_all([tier.write_async(h, s) for h, s in zip(handles, srcs, strict=True)])
        outs = [torch.empty_like(parts[0]) for _ in parts] + [torch.empty_like(srcs[-1])]
        wait_all([tier.read_async(h, o) for h, o in zip(handles, outs, strict=True)])
        for s, o in zip(srcs, outs, strict=True):
            assert torch.equal(s, o)
        if THP_ON:
            # every chunk (the parts' and the tier's bounce blocks') is on huge pages
            assert arena.huge_pages().huge_bytes == arena.report().capacity_bytes >= 4 * HUGE
    arena.close()
