"""``Timeline``: memory per tier over a run, sampled by a background thread, with step marks.

Usable from any training loop::

    with memopt.memory.Timeline(interval=0.005) as tl:
        for step in range(5):
            train_step()
            tl.mark(f"step {step}")
    tl.write("report/", estimate=memopt.memory.estimate(...))   # timeline.png + timeline.md

Per sample (seconds since start, bytes above the baseline taken on entry):

- ``host``: the process's resident set (``VmRSS`` of /proc/self/status). Entry also resets
  the kernel's high-water mark (``/proc/self/clear_refs``), and every mark reads ``VmHWM``, so
  a peak between two samples is still caught: ``peak()`` reports it;
- ``device``: ``torch.cuda.memory_allocated`` (and the allocator's ``max_memory_allocated``
  at marks) on CUDA; on a CPU run there is no separate device: device bytes are in ``host``;
- ``pinned``: bytes reserved by the ``PinnedArena`` given (``report().reserved_bytes``);
- ``disk``: bytes held by the NVMe tiers given (``report().requested_bytes``).

Every tier is reported above its value on entry.

The thread only reads counters, so the loop it watches is not slowed beyond the sampling
itself (one /proc read per ``interval``).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PROC_STATUS = "/proc/self/status"


def proc_kib(field: str) -> int:
    """A /proc/self/status field in KiB (``VmRSS``, ``VmHWM``); 0 where there is no /proc."""
    try:
        with open(PROC_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's ``VmHWM`` to the current RSS (Linux); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mmap_large_allocations(threshold: int = 1 << 16) -> bool:
    """Make glibc serve allocations >= ``threshold`` bytes by ``mmap`` (``mallopt``), from now on.

    By default glibc raises its mmap threshold after the first large free (up to 32 MiB), so
    freed tensors stay in the heap and the resident set keeps memory no tensor uses. With a
    fixed threshold every tensor larger than it is returned to the kernel on free, and the
    resident set follows the live tensor bytes: what a measurement of an estimate needs. Costs
    page faults on every large allocation; for measurement runs only. False where not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Sample:
    t: float
    host: int
    device: int
    pinned: int
    disk: int


class Timeline:
    """Samples memory per tier in a thread; ``mark`` adds labelled points (see above)."""

    def __init__(
        self,
        interval: float = 0.005,
        *,
        arena: Any = None,
        tiers: Sequence[Any] = (),
        device: torch.device | str | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"Timeline interval must be > 0 seconds, got {interval!r}")
        self.interval = float(interval)
        self.arena, self.tiers = arena, list(tiers)
        dev = torch.device(device) if device is not None else None
        self.cuda = dev is not None and dev.type == "cuda"
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str]] = []
        self.host_peak = 0
        self.device_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.base_host = self.base_device = self.base_pinned = self.base_disk = 0
        self.t0 = 0.0

    # -- sampling ----------------------------------------------------------------------
    def _read(self) -> Sample:
        host = proc_kib("VmRSS") * 1024 - self.base_host
        device = torch.cuda.memory_allocated() - self.base_device if self.cuda else 0
        pinned, disk = self._tier_bytes()
        return Sample(
            time.perf_counter() - self.t0, host, device, pinned - self.base_pinned,
            disk - self.base_disk,
        )  # fmt: skip

    def _tier_bytes(self) -> tuple[int, int]:
        pinned = self.arena.report().reserved_bytes if self.arena is not None else 0
        return pinned, sum(t.report().requested_bytes for t in self.tiers)

    def sample(self) -> Sample:
        s = self._read()
        with self._lock:
            self.samples.append(s)
            self.host_peak = max(self.host_peak, s.host)
            self.device_peak = max(self.device_peak, s.device)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Timeline:
        """Start sampling; a Timeline used again starts afresh (its earlier samples, marks
        and peaks are dropped: read them before)."""
        if self._thread is not None:
            raise RuntimeError("Timeline is already recording; it cannot be entered twice")
        self._stop.clear()
        with self._lock:
            self.samples, self.marks = [], []
            self.host_peak = self.device_peak = 0
        gc.collect()
        self.base_host = proc_kib("VmRSS") * 1024
        self.base_pinned, self.base_disk = self._tier_bytes()
        reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_device = torch.cuda.memory_allocated()
        self.t0 = time.perf_counter()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memopt-timeline", daemon=True)
        self._thread.start()
        return self

    def mark(self, label: str) -> None:
        """A labelled point now; also folds the kernel's/allocator's peak since entry in."""
        if self.cuda:
            torch.cuda.synchronize()
            self.device_peak = max(
                self.device_peak, torch.cuda.max_memory_allocated() - self.base_device
            )
        hwm = proc_kib("VmHWM") * 1024 - self.base_host
        s = self.sample()
        with self._lock:
            self.host_peak = max(self.host_peak, hwm)
            self.marks.append((s.t, label))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.mark("end")

    # -- results -----------------------------------------------------------------------
    def peak(self) -> dict[str, int]:
        """Peak bytes above the entry baseline per tier (host includes ``VmHWM`` at marks)."""
        with self._lock:
            return {
                "host": self.host_peak,
                "device": self.device_peak,
                "pinned": max((s.pinned for s in self.samples), default=0),
                "disk": max((s.disk for s in self.samples), default=0),
            }

    def write(self, directory: str | os.PathLike[str], estimate: Any = None) -> dict[str, Path]:
        """``timeline.png`` and ``timeline.md`` under ``directory`` (see ``memopt.memory.plot``)."""
        from memopt.memory.plot import write_report

        return write_report(self, Path(directory), estimate)
