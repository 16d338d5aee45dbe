"""Measured vs predicted peak for the memory tests, run on two spawned ranks (fresh processes,
so glibc can be told to mmap every large allocation, ``mmap_large_allocations``, without
changing the allocator of the pytest process, and the resident set follows the live tensor
bytes). Each rank measures half of the single-process cases, then both run ZeRO-1, ZeRO-2
and ZeRO-3 together."""

from __future__ import annotations

import warnings
from typing import Any

TINY = {"hidden": 192, "layers": 2, "heads": 4, "vocab": 8000, "batch_size": 4, "seq_len": 128}
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


def on_rank(rank: int, world: int) -> list[dict[str, Any]]:
    from memopt.memory.timeline import mmap_large_allocations

    warnings.simplefilter("ignore")
    assert mmap_large_allocations()
    rows = [measure(c) for c in SINGLE[rank::world]]
    return rows + [measure({"stage": s, "world_size": world}) for s in (1, 2, 3)]


#: Stage 3 with parameter shards and optimizer state off the device (memopt.memory.stage3_offload).
STAGE3_OFFLOAD = [
    {"offload_params": "nvme"},
    {"offload_params": "nvme", "offload": "nvme"},
    {"offload_params": "cpu"},
]


def on_rank_stage3_offload(rank: int, world: int, root: str) -> list[dict[str, Any]]:
    from memopt.memory.timeline import mmap_large_allocations

    warnings.simplefilter("ignore")
    assert mmap_large_allocations()
    rows = []
    for extra in STAGE3_OFFLOAD:
        case: dict[str, Any] = {"stage": 3, "world_size": world, **extra}
        if "nvme" in extra.values():
            case["nvme_path"] = f"{root}/nvme"
        rows.append(measure(case))
    return rows
