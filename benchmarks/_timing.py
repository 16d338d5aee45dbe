"""The median wall time of optimizer steps, after untimed warm-up steps."""

from __future__ import annotations

import statistics
import time

import torch


def median_step(opt: torch.optim.Optimizer, steps: int, warmup: int = 2) -> float:
    """Seconds: ``warmup`` untimed steps, then the median of ``steps`` timed ones."""
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
