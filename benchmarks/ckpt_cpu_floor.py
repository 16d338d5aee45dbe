"""The host-CPU work a checkpoint of a given size cannot avoid, against torch.save's stall.

Where training saturates the host's cores (a CPU training loop), every CPU-second a background
checkpoint spends comes out of the training steps it overlaps, however it is scheduled. This
script measures, for one checkpoint's bytes (default: the ~100M-parameter model + AdamW state
of ``ckpt_stall_bench.py``, 1.2 GB), each piece of that work alone on an idle machine:

- the copy into host staging (memopt's arena) on the copier thread alone and with torch's
  OpenMP team of every core (``copy_``), and one pass that only reads the bytes (the memory
  bandwidth floor of anything that touches every byte, such as a checksum);
- the checksum: crc32c (the ``crc32c`` package) and zlib's crc32 over the staged bytes, and
  memopt's one-pass copy + crc32c (``memopt/checkpoint/copy_crc.py``), what the checkpointer
  runs for CPU tensors;
- O_DIRECT writes of the bytes (memopt's writer with its checksum pass switched off, fsync
  included), from the staging arena and from memory of torch's allocator (page-aligned), with
  fio on the same file size as the disk's reference;
- ``torch.save`` of the same state (model + AdamW state dicts, synchronous, plus fsync), the
  stall that the issue's 0.02x target is a fraction of.

Each line gives wall seconds and process CPU seconds (user + system, every thread). The floor
is the CPU seconds of the work no design can skip: reading every byte once (a checksum must)
plus the kernel's share of the writes; a design that also copies adds the copy. The printed
ratios divide them by torch.save's wall time.

    python benchmarks/ckpt_cpu_floor.py                 # 1.2 GB (100M params + AdamW)
    python benchmarks/ckpt_cpu_floor.py --params-m 25   # a quarter of it
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from memopt.checkpoint import copy_crc
from memopt.checkpoint.checksum import parallel_checksum
from memopt.checkpoint.writer import write_data_file
from memopt.offload.arena import ArenaConfig, PinnedArena

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fio import MIB, fio_write  # noqa: E402
from _machine import cpu_model  # noqa: E402

PAGE = 4096


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (user + sys) of ``fn``."""
    walls, cpus = [], []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        walls.append(wall)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def write_only(path: Path, data: torch.Tensor) -> None:
    """memopt's writer (O_DIRECT, 8 x 8 MiB in flight, fsync) with no checksum pass."""
    path.unlink(missing_ok=True)
    try:  # a checksum "already known" skips the writer's pass
        write_data_file(str(path), b"\0" * PAGE, data, "crc32c", True, True,
                        known_checksum=lambda: 0)  # fmt: skip
    finally:
        path.unlink(missing_ok=True)


def torch_save(path: Path, state: dict) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-m", type=float, default=100.0,
                    help="parameters in millions; state = params + two AdamW moments, fp32")
    ap.add_argument("--layers", type=int, default=6, help="square weights the params make")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in /tmp)")
    args = ap.parse_args()
    n_params = int(args.params_m * 1e6)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_floor_", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)

    # the state: fp32 params and two moments, like a model + AdamW (torch's allocator)
    # model-sized tensors (6 x 4082^2 weights at 100M: 67 MB each), three per weight (the
    # parameter and AdamW's two moments), each its own allocation as in a training process
    side = int((n_params / args.layers) ** 0.5)
    names = [f"{kind}.{i}" for i in range(args.layers) for kind in ("w", "exp_avg", "exp_avg_sq")]
    tensors = {n: torch.randn(side, side) for n in names}
    nbytes = sum(t.numel() * 4 for t in tensors.values())
    src = torch.cat([t.reshape(-1) for t in tensors.values()]).view(torch.uint8)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, torch "
          f"{torch.__version__}, load average {os.getloadavg()}; {nbytes / 1e9:.2f} GB, "
          f"median of {args.repeats}, dir {root}")  # fmt: skip
    arena = PinnedArena(ArenaConfig(chunk_bytes=0, alignment=64, pin="off"))
    block = arena.alloc(nbytes, alignment=PAGE)
    staging = arena.bytes_view(block)[:nbytes]
    staging.fill_(0)  # fault the pages in, as a reused staging block is
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)  # torch's allocator, page-aligned view
    off = (-raw.data_ptr()) % PAGE
    live = raw[off : off + nbytes]
    wbytes = nbytes // PAGE * PAGE  # O_DIRECT wants whole pages (the checkpointer pads to them)
    live.copy_(src)
    d_np = staging.numpy()
    slots, pos = [], 0
    for t in tensors.values():
        slots.append((t, staging[pos : pos + t.numel() * 4]))
        pos += t.numel() * 4

    def copy_numpy() -> None:
        for t, dst in slots:
            np.copyto(dst.numpy(), t.view(-1).view(torch.uint8).numpy())

    def copy_torch() -> None:
        for t, dst in slots:
            dst.view(torch.float32).copy_(t.view(-1))

    def copy_fused() -> None:
        value = 0
        for t, dst in slots:
            value = copy_crc.copy_crc32c(dst, t, value)
    view = memoryview(d_np)

    rows: list[tuple[str, float, float]] = []

    def row(name: str, fn: Callable[[], object]) -> float:
        wall, cpu = timed(fn, args.repeats)
        rows.append((name, wall, cpu))
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {nbytes / wall / 1e9:.2f} |", flush=True)
        return cpu

    print("| work (one checkpoint's bytes) | wall s | CPU s | GB/s |\n|---|---:|---:|---:|")
    copy1 = row("copy to staging, copier thread alone (np.copyto per tensor)", copy_numpy)
    row(f"copy to staging, torch copy_ per tensor ({torch.get_num_threads()} threads)",
        copy_torch)  # fmt: skip
    row("one copy of all the bytes from one buffer (np.copyto; glibc streams it)",
        lambda: np.copyto(d_np, src.numpy()))  # fmt: skip
    read = row("read every byte once (np.bitwise_xor.reduce, u64)",
               lambda: np.bitwise_xor.reduce(d_np.view(np.uint64)))  # fmt: skip
    crc = row("crc32c over the staged bytes (1 thread)",
              lambda: parallel_checksum("crc32c", view, 8 * MIB, 0, 1))  # fmt: skip
    row("zlib crc32 over the staged bytes (1 thread)",
        lambda: parallel_checksum("crc32", view, 8 * MIB, 0, 1))  # fmt: skip
    fused = None
    if copy_crc.available():
        fused = row("copy to staging + crc32c in one pass per tensor (memopt copy_crc, 1 thread)",
                    copy_fused)  # fmt: skip
    io = row("O_DIRECT write + fsync from the staging arena (no checksum)",
             lambda: write_only(root / "w.bin", staging[:wbytes]))  # fmt: skip
    row("O_DIRECT write + fsync from torch-allocated memory (no checksum)",
        lambda: write_only(root / "w.bin", live[:wbytes]))  # fmt: skip
    fio = [fio_write(root, nbytes, 64) for _ in range(2)]
    if None in fio:
        print("# fio not installed: no disk reference")
    else:
        print(f"# fio (libaio, O_DIRECT, 1 MiB, QD 64, end_fsync), two runs: "
              f"{' / '.join(f'{b / 1e9:.2f}' for b in fio if b)} GB/s")  # fmt: skip
    state = {"model": {n: t for n, t in tensors.items() if n.startswith("w.")},
             "optim": {n: t for n, t in tensors.items() if not n.startswith("w.")}}  # fmt: skip
    ts_wall, ts_cpu = timed(lambda: torch_save(root / "ts.pt", state), args.repeats)
    print(f"| torch.save of the same state + fsync (the peer) | {ts_wall:.3f} | {ts_cpu:.3f} | "
          f"{nbytes / ts_wall / 1e9:.2f} |")  # fmt: skip
    floor = min(read, crc) + io
    with_copy = copy1 + crc + io
    print(f"# floor (touch every byte once + the writes' CPU): {floor:.3f} CPU s = "
          f"{floor / ts_wall:.3f}x torch.save's stall (target <= 0.02)")
    print(f"# staged, two passes (one-thread copy, then crc32c) + writes: {with_copy:.3f} CPU s "
          f"= {with_copy / ts_wall:.3f}x torch.save's stall")
    if fused is not None:
        print(f"# staged, one pass (memopt's copy_crc) + writes: {fused + io:.3f} CPU s = "
              f"{(fused + io) / ts_wall:.3f}x torch.save's stall")
    arena.close()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
