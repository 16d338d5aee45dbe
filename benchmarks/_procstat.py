"""Process memory figures for the benchmarks, read from /proc/self/status (Linux)."""

from __future__ import annotations


def rss_kib(field: str) -> int:
    """A /proc/self/status memory field in KiB: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
