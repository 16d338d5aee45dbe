"""Per-save timings: what the training loop paid (stall) and when the save became durable."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SaveRecord:
    """One ``save``. Times in seconds, measured from the ``save`` call.

    stall_s: training time lost to this save: the capture inside ``save`` (references and
        the file plan, no copy), waiting for a staging slot, and fence waits before an
        optimizer step while this save's device-to-host copy was unfinished.
    copied_s: when the copy to host staging finished.
    write_start_s: when the writer began this rank's files (file created, first byte
        submitted): once the data section is staged (its first chunk with ``follow_copy``).
    written_s: when this rank's files were written and fsynced.
    durable_s: when the snapshot was published (every rank's files fsynced, renamed).
    protected_s: with ``redundancy=``, when peers held this save in host memory (0 if not);
        ``protected`` says whether they do, ``protect_note`` why not (skipped, failed).
    nbytes: bytes of this rank's tensor file (header + data section).
    background_cpu_s: CPU seconds the copier and writer threads spent on this save (copy to
        staging, checksum, submitting writes, publish; per-thread CPU time). Where training
        saturates the host's cores, the steps that overlap the save lose about this much
        time even though ``stall_s`` stays near zero. Not counted: the I/O engine's own
        thread, the kernel's work for the writes, and the checksum's helper threads on
        machines of 8+ cores (``writer.CRC_WORKERS``; below that the writer thread runs it).

    Two throughputs in bytes/s (0 until the save is durable): ``writer_Bps`` = nbytes /
    (durable_s - write_start_s), the writer's own rate from its first byte to the publish
    (the like-for-like figure against a disk benchmark such as fio); ``save_Bps`` = nbytes /
    durable_s, from the ``save`` call, the copy to host staging before the first write
    included.
    """

    step: int
    nbytes: int = 0
    capture_s: float = 0.0
    stall_s: float = 0.0
    copied_s: float = 0.0
    write_start_s: float = 0.0
    written_s: float = 0.0
    durable_s: float = 0.0
    ok: bool = False
    protected_s: float = 0.0
    protected: bool = False
    protect_note: str = ""
    background_cpu_s: float = 0.0

    @property
    def writer_Bps(self) -> float:
        span = self.durable_s - self.write_start_s
        return self.nbytes / span if self.ok and span > 0 else 0.0

    @property
    def save_Bps(self) -> float:
        return self.nbytes / self.durable_s if self.ok and self.durable_s > 0 else 0.0


@dataclass
class CheckpointStats:
    records: list[SaveRecord] = field(default_factory=list)

    @property
    def last(self) -> SaveRecord | None:
        return self.records[-1] if self.records else None

    @property
    def total_stall_s(self) -> float:
        return sum(r.stall_s for r in self.records)

    def summary(self) -> dict[str, float]:
        done = [r for r in self.records if r.ok]
        n = max(1, len(done))
        return {
            "saves": float(len(done)),
            "mean_stall_s": sum(r.stall_s for r in done) / n,
            "mean_durable_s": sum(r.durable_s for r in done) / n,
            "mean_writer_Bps": sum(r.writer_Bps for r in done) / n,
            "mean_save_Bps": sum(r.save_Bps for r in done) / n,
            "bytes": float(sum(r.nbytes for r in done)),
        }
