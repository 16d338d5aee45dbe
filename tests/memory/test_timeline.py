"""``Timeline``: samples, marks, the peak between samples, PNG and markdown outputs."""

from __future__ import annotations

import time

import pytest
import torch

from memopt.memory import Timeline, estimate
from memopt.offload import ArenaConfig, PinnedArena
from tests.memory.conftest import tiny_config


def test_timeline_catches_a_peak_and_writes_png_and_table(tmp_path) -> None:
    arena = PinnedArena(ArenaConfig(pin="off"))
    with Timeline(interval=0.002, arena=arena) as tl:
        big = torch.ones(48 * 2**20 // 4)  # 48 MiB, touched
        tl.mark("allocated")
        del big
        tl.mark("freed")
        time.sleep(0.01)
    peak = tl.peak()
    assert peak["host"] >= 40 * 2**20  # VmHWM read at the mark catches it
    labels = [label for _, label in tl.marks]
    assert labels == ["allocated", "freed", "end"]
    assert len(tl.samples) >= 3 and tl.samples == sorted(tl.samples, key=lambda s: s.t)
    est = estimate(tiny_config(), batch_size=1, seq_len=16)
    paths = tl.write(tmp_path / "rep", estimate=est)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = paths["md"].read_text()
    assert "| allocated |" in md and "| host |" in md and "predicted / measured" in md
    assert "memopt estimate" in md


def test_pinned_tier_counts_from_entry() -> None:
    arena = PinnedArena(ArenaConfig(pin="off"))
    before = arena.alloc(1 << 20)  # held before the timeline: part of its baseline
    with Timeline(interval=0.002, arena=arena) as tl:
        during = arena.alloc(3 << 20)
        tl.mark("allocated")
    assert tl.peak()["pinned"] == arena.report().reserved_bytes - (1 << 20)
    assert 3 << 20 <= tl.peak()["pinned"] < 4 << 20
    arena.free(during)
    arena.free(before)
    arena.close()


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        Timeline(interval=0)


def test_a_timeline_used_again_starts_afresh() -> None:
    """The second `with` block kept the first one's stop flag (it sampled nothing) and its
    samples and peaks (peak() reported the first block's allocation)."""
    arena = PinnedArena(ArenaConfig(pin="off"))
    tl = Timeline(interval=0.001, arena=arena)
    with tl:
        block = arena.alloc(3 << 20)
        tl.mark("allocated")
        arena.free(block)
    assert tl.peak()["pinned"] >= 3 << 20
    with tl:
        time.sleep(0.05)
    assert len(tl.samples) > 5, "the second block did not sample"
    assert tl.peak()["pinned"] == 0, "the first block's peak leaked into the second"
    assert [label for _, label in tl.marks] == ["end"]
    with tl, pytest.raises(RuntimeError, match="already recording"):
        tl.__enter__()
    arena.close()
