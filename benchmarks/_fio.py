"""fio as the disk's reference bandwidth, run next to the thing it is compared with.

``fio_write(directory, size, queue_depth)``: one sequential write job in ``directory``
(``ioengine=libaio, direct=1, bs=1 MiB, numjobs=1, end_fsync=1``: O_DIRECT like memopt's
writer, and the final fsync counted like memopt's), of ``size`` bytes, the file removed
afterwards (outside the timing). Returns bytes per second, or None when fio is missing.

``Adjacent`` keeps, for each timed save, the fio figure right before and right after it: the
disk here drifts by up to 2x over tens of seconds, so a save is compared with the fio runs
adjacent to it, never with a figure taken minutes away.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20


def fio_write(directory: Path, size: int, queue_depth: int, bs: int = MIB) -> float | None:
    if not shutil.which("fio"):
        return None
    path = directory / "fio.dat"
    size = max(bs, size // bs * bs)
    cmd = [
        "fio", "--name=disk", f"--filename={path}", f"--size={size}", f"--bs={bs}",
        f"--iodepth={queue_depth}", "--ioengine=libaio", "--direct=1", "--rw=write",
        "--numjobs=1", "--end_fsync=1", "--output-format=json",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return float(json.loads(out)["jobs"][0]["write"]["bw_bytes"])
    finally:
        path.unlink(missing_ok=True)


@dataclass
class Adjacent:
    """Per save: (bytes/s by a definition, fio before, fio after)."""

    directory: Path
    size: int
    queue_depth: int
    saves: list[dict[str, float]] = field(default_factory=list)
    _before: float | None = None

    def before(self) -> None:
        self._before = fio_write(self.directory, self.size, self.queue_depth)

    def after(self, **rates: float) -> None:
        after = fio_write(self.directory, self.size, self.queue_depth)
        if self._before is None or after is None:
            return
        ref_max, ref_mean = max(self._before, after), (self._before + after) / 2
        row = {"fio_before": self._before, "fio_after": after, **rates}
        for key, value in rates.items():
            row[f"{key}/fio_max"] = value / ref_max
            row[f"{key}/fio_mean"] = value / ref_mean
        self.saves.append(row)

    def median(self, key: str, skip: int = 0) -> float:
        vals = [s[key] for s in self.saves[skip:]]
        return statistics.median(vals) if vals else float("nan")
