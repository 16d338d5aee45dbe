"""Measured vs predicted peak for the memory tests: run in a fresh process (or on spawned
ranks), so glibc can be told to mmap every large allocation (``mmap_large_allocations``)
without changing the allocator of the pytest process, and the resident set follows the live
tensor bytes."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

TINY = {"hidden": 128, "layers": 2, "vocab": 4000, "batch_size": 4, "seq_len": 64}
SINGLE = [
    {"optimizer": "adamw"},
    {"optimizer": "galore", "rank": 32},
    {"optimizer": "apollo_mini"},
    {"optimizer": "adamw", "state_dtype": "int8"},
]


def measure(case: dict[str, Any], steps: int = 2) -> dict[str, Any]:
    from memopt.cli._workload import Workload, run
    from memopt.memory import Timeline

    w = Workload(**TINY, **case)
    est = w.estimate()
    tl = Timeline()
    run(w, steps, tl)
    return {"case": case, "measured": tl.peak()["host"], "predicted": est.host_total}


def main() -> None:
    from memopt.memory.timeline import mmap_large_allocations

    warnings.simplefilter("ignore")
    assert mmap_large_allocations()
    json.dump([measure(c) for c in SINGLE], sys.stdout)


def on_rank(rank: int, world: int, stages: list[int]) -> list[dict[str, Any]]:
    from memopt.memory.timeline import mmap_large_allocations

    warnings.simplefilter("ignore")
    assert mmap_large_allocations()
    return [measure({"stage": s, "world_size": world}) for s in stages]


if __name__ == "__main__":
    main()
