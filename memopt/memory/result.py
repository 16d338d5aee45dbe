"""``MemoryEstimate``: predicted peak bytes per tier and category, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TIERS = ("device", "pinned_host", "pageable_host", "disk")
CATEGORIES = (
    "parameters",
    "gradients",
    "optimizer_state",
    "master_weights",
    "activations",
    "buffers",
    "temporaries",
)


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes per tier, each split by category (``breakdown[tier][category]``).

    The split of a tier is taken at that tier's peak moment, so ``peak[tier]`` equals the sum
    of ``breakdown[tier]``. ``phase`` names the moment ("forward/backward" or "optimizer
    step"). ``device_kind`` is "cpu" when the run has no accelerator: "device" bytes are then
    host RAM too (add them to the host tiers for the machine's total).
    """

    breakdown: dict[str, dict[str, int]]
    phase: str
    device_kind: str
    world_size: int
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> dict[str, int]:
        return {t: sum(self.breakdown[t].values()) for t in TIERS}

    @property
    def device_peak(self) -> int:
        return self.peak["device"]

    @property
    def host_total(self) -> int:
        """Host RAM of one rank: both host tiers, plus the device tier on a CPU run."""
        p = self.peak
        extra = p["device"] if self.device_kind == "cpu" else 0
        return p["pinned_host"] + p["pageable_host"] + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "breakdown": {t: dict(c) for t, c in self.breakdown.items()},
            "phase": self.phase,
            "device_kind": self.device_kind,
            "world_size": self.world_size,
            "host_total": self.host_total,
            "config": dict(self.config),
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """A markdown table: categories as rows, tiers as columns, per rank."""
        head = "| per rank | " + " | ".join(TIERS) + " |"
        rows = [head, "|---|" + "---:|" * len(TIERS)]
        for c in CATEGORIES:
            cells = [self.breakdown[t].get(c, 0) for t in TIERS]
            if any(cells):
                rows.append(f"| {c} | " + " | ".join(fmt_bytes(v) for v in cells) + " |")
        rows.append(
            "| **peak** | " + " | ".join(f"**{fmt_bytes(self.peak[t])}**" for t in TIERS) + " |"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        lines = [f"memopt estimate (world size {self.world_size}, peak during {self.phase})"]
        lines.append(self.table())
        if self.device_kind == "cpu":
            lines.append(
                "note: CPU run: the 'device' column is host RAM as well; host total per rank "
                f"{fmt_bytes(self.host_total)}"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
