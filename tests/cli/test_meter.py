"""The recipe log line's memory figures: the pinned arena's bytes and the host memory it holds."""

from __future__ import annotations

import torch

from memopt.cli._meter import Meter
from memopt.config import Config
from memopt.memory import fmt_bytes
from memopt.offload.arena import default_arena


def test_pinned_column_shows_bytes_and_the_chunks_held() -> None:
    arena = default_arena()
    block = arena.alloc(3 << 20)  # 3 MiB of state: the arena holds at least a whole chunk
    try:
        report = arena.report()
        assert report.capacity_bytes > report.reserved_bytes  # (what the column used to hide)
        meter = Meter(Config())
        tiers = meter.tiers(torch.device("cpu"))
        assert tiers["pinned"] == report.reserved_bytes
        assert tiers["pinned_held"] == report.capacity_bytes
        line = meter.line(object())
        held = fmt_bytes(report.capacity_bytes)
        assert f"pinned {fmt_bytes(report.reserved_bytes)} (held {held})" in line, line
    finally:
        arena.free(block)
