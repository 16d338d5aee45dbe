"""``CheckpointConfig``: the typed options of ``AsyncCheckpointer`` (validated eagerly)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Checksum = Literal["auto", "crc32c", "crc32"]


@dataclass(frozen=True)
class CheckpointConfig:
    """Options of an ``AsyncCheckpointer``.

    keep: published snapshots kept; older ones are removed only after a newer one is published.
    max_inflight: snapshots staged in host memory at once (copying or writing); a ``save``
        beyond it waits for the oldest (counted as stall).
    alignment: byte alignment of every tensor in the files (4096 suits ``O_DIRECT``).
    checksum: per-file checksum; ``"auto"`` is crc32c when the ``crc32c`` package is installed,
        else zlib's crc32 (the algorithm is recorded in the manifest).
    fsync: fsync files and directories before publishing (turn off only for tests of speed).
    direct_io: write the tensor files with ``O_DIRECT`` (no page cache: steadier and faster
        here, 1.2 GB/s against 0.1-0.8 GB/s buffered on a shared disk); buffered writes where
        the file system refuses it or the alignment is below 4096.
    save_rng: store the RNG states of every rank (torch CPU, CUDA, numpy, python).
    restore_rng: restore this rank's RNG states on ``load``.
    verify: check checksums on ``load``.
    pin: pin the host staging buffers (``"auto"``: when CUDA is available).
    background_nice: CPU niceness (0-19) of the copier and writer threads (Linux, per thread;
        0: the training thread's). Above 0 they yield the cores to training when both compete,
        which matters when training runs on the CPU itself. Elsewhere a warning, then
        ignored. (CPU-tensor copies run on the copier thread alone either way.)
    checksum_in_copy: CPU tensors are copied into staging and checksummed in one pass (the
        native ``copy_crc`` kernel: CRC-32C with SSE4.2), so the writer makes no checksum
        pass: 0.17 instead of 0.28 CPU s per 1.2 GB on the 2-core VM of docs/benchmarks.md,
        with the same write rate. Used when ``checksum`` resolves to crc32c and the native
        library is built on an x86 CPU with SSE4.2; elsewhere the copy-then-checksum path
        runs. False forces that path.
    """

    keep: int = 3
    max_inflight: int = 2
    alignment: int = 4096
    checksum: Checksum = "auto"
    fsync: bool = True
    direct_io: bool = True
    save_rng: bool = True
    restore_rng: bool = True
    verify: bool = True
    pin: Literal["auto", "off"] = "auto"
    background_nice: int = 0
    checksum_in_copy: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"CheckpointConfig.keep must be an int >= 1, got {self.keep!r}")
        if not isinstance(self.max_inflight, int) or self.max_inflight < 1:
            raise ValueError(
                f"CheckpointConfig.max_inflight must be an int >= 1, got {self.max_inflight!r}"
            )
        a = self.alignment
        if not isinstance(a, int) or a < 8 or a & (a - 1) or a > 4096:
            raise ValueError(
                f"CheckpointConfig.alignment must be a power of two in [8, 4096], got {a!r}"
            )
        if self.checksum not in ("auto", "crc32c", "crc32"):
            raise ValueError(
                f"CheckpointConfig.checksum must be 'auto', 'crc32c' or 'crc32', "
                f"not {self.checksum!r}"
            )
        if self.pin not in ("auto", "off"):
            raise ValueError(f"CheckpointConfig.pin must be 'auto' or 'off', not {self.pin!r}")
        for name in ("fsync", "direct_io", "save_rng", "restore_rng", "verify", "checksum_in_copy"):
            if not isinstance(getattr(self, name), bool):  # ("no" would be truthy: on)
                raise ValueError(
                    f"CheckpointConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )
        n = self.background_nice
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 19:
            raise ValueError(
                f"CheckpointConfig.background_nice must be an int in [0, 19], got {n!r}"
            )
