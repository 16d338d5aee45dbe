"""NVMe tier bandwidth against fio and DeepSpeed's async-I/O handle, in one run.

    .venv/bin/python benchmarks/nvme_bench.py [--dir /tmp/nvme_bench] [--size-mib 512]
        [--block-size-kib 1024] [--queue-depth 32] [--repeats 3] [--sweep]
        [--backends native,native+huge,threads] [--warmup 1] [--no-fio] [--no-deepspeed]

Each tool moves the same bytes (``--size-mib``) with O_DIRECT, the same block size and the same
queue depth, into and out of a file in ``--dir``:

- memopt: ``NVMeTier`` with each backend of ``--backends`` (native Linux AIO with its default
  workers, ``native:W`` with W workers, thread pool; a ``+huge`` suffix puts the arena on
  transparent huge pages, ``ArenaConfig(huge_pages="auto")``, and the run prints how many bytes
  huge pages really backed), the data split into 8 handles (like 8 optimizer sub-groups) all
  submitted before waiting, from and to page-aligned arena tensors;
- fio: ``ioengine=libaio, direct=1, bs, iodepth``, one job, sequential write then read;
- DeepSpeed: ``aio_handle(bs, qd, single_submit=False, overlap_events=True, 1)`` with
  ``sync_pwrite`` / ``sync_pread`` of one locked buffer (the ZeRO-Infinity swap path).

Write then read, ``--repeats`` rounds in which every tool runs once (the order rotates each
round, so the disk's drift hits all alike), after ``--warmup`` untimed rounds; the median
GB/s (1e9 bytes/s) is reported with ratios memopt/fio and memopt/DeepSpeed, and the median
number of block-layer requests each tool's write and read of ``--size-mib`` cost, from the
deltas of ``/sys/dev/block/<dev>/stat`` around its turn (a 1 MiB request the queue limits
split counts twice; other processes' I/O on the disk adds to it). A missing peer stops the
run with exit status 1 and says how to install it (fio: ``apt-get install fio``; DeepSpeed's
async_io op: ``pip install deepspeed`` and ``apt-get install libaio-dev``, which
``scripts/setup.sh`` with the ``bench`` extra installs as root); ``--no-fio`` /
``--no-deepspeed`` leave a peer out explicitly, and the output says it was skipped.
``--sweep`` also times memopt at queue depths 4-32 and block sizes 1-4 MiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _peers import peer_missing, skipped  # benchmarks/ is on sys.path when run as a script

from memopt.offload import ArenaConfig, NVMeConfig, NVMeTier, PinnedArena
from memopt.offload.io_backend import IOBackend
from memopt.offload.native_aio import NativeAIOBackend, make_backend
from memopt.offload.tier import wait_all

N_HANDLES = 8


def _once(tier: NVMeTier, handles: list, bufs: list[torch.Tensor], size: int) -> tuple:
    t0 = time.perf_counter()
    wait_all([tier.write_async(h, b) for h, b in zip(handles, bufs, strict=True)])
    w = size / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    wait_all([tier.read_async(h, b) for h, b in zip(handles, bufs, strict=True)])
    return w, size / (time.perf_counter() - t0) / 1e9


Peers = dict[str, Callable[[], tuple[float, float]]]


def disk_counter(d: Path) -> Callable[[], tuple[int, int]] | None:
    """(completed write requests, completed read requests) of the block device holding ``d``,
    from ``/sys/dev/block/<major>:<minor>/stat``; None where that file is missing."""
    dev = os.stat(d).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    if not stat.exists():
        return None

    def read() -> tuple[int, int]:
        f = stat.read_text().split()
        return int(f[4]), int(f[0])

    return read


def backend_for(kind: str, qd: int, bs: int) -> IOBackend:
    """``native``, ``threads`` or ``native:W`` (the native engine with W workers), with an
    optional ``+huge`` suffix (handled by the caller: huge-page arena)."""
    name, _, workers = kind.removesuffix("+huge").partition(":")
    if name == "native" and workers:
        return NativeAIOBackend(qd, bs, workers=int(workers))
    return make_backend(qd, bs, name)


def memopt_runs(
    d: Path,
    size: int,
    bs: int,
    qd: int,
    repeats: int,
    kinds: list[str],
    warmup: int = 0,
    peers: Peers | None = None,
    requests: dict[str, tuple[list[int], list[int]]] | None = None,
) -> dict[str, tuple[list[float], list[float]]]:
    """One tier per I/O engine (own file in ``d/<kind>``) and each peer (one write + read per
    call), timed in interleaved rounds (the order rotates each round) so the disk's drift hits
    every tool alike; the first ``warmup`` rounds are not recorded. With ``requests`` given,
    the disk's (write, read) request-count deltas of each turn are appended to it per tool."""
    peers = peers or {}
    names = kinds + list(peers)
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in names}
    count = disk_counter(d) if requests is not None else None
    part = size // N_HANDLES
    arenas, tiers, state = [], {}, {}
    for kind in kinds:
        huge = "auto" if kind.endswith("+huge") else "off"
        arena = PinnedArena(ArenaConfig(initial_bytes=size, chunk_bytes=0, huge_pages=huge))
        if huge != "off":
            print(f"# {kind}: {arena.huge_pages().huge_bytes >> 20} MiB of the "
                  f"{arena.report().capacity_bytes >> 20} MiB arena on huge pages")  # fmt: skip
        cfg = NVMeConfig(
            directory=d / kind, capacity_bytes=2 * size + (64 << 20), block_size=bs,
            queue_depth=qd,
        )  # fmt: skip
        tier = NVMeTier(cfg, arena=arena, backend=backend_for(kind, qd, bs))
        bufs = [arena.tensor(arena.alloc(part, alignment=4096)) for _ in range(N_HANDLES)]
        for b in bufs:
            b.random_(0, 255)
        arenas.append(arena)
        tiers[kind] = tier
        state[kind] = ([tier.allocate(part) for _ in range(N_HANDLES)], bufs)
    try:
        for rnd in range(warmup + repeats):
            shift = rnd % len(names)
            for kind in names[shift:] + names[:shift]:
                before = count() if count else (0, 0)
                w, r = peers[kind]() if kind in peers else _once(tiers[kind], *state[kind], size)
                if rnd < warmup:
                    continue
                out[kind][0].append(w)
                out[kind][1].append(r)
                if count and requests is not None:
                    after = count()
                    reqs = requests.setdefault(kind, ([], []))
                    reqs[0].append(after[0] - before[0])
                    reqs[1].append(after[1] - before[1])
    finally:
        for tier in tiers.values():
            tier.close()
        for arena in arenas:
            arena.close()
    return out


def memopt_run(
    d: Path, size: int, bs: int, qd: int, repeats: int, kind: str = "threads"
) -> tuple[list[float], list[float]]:
    return memopt_runs(d, size, bs, qd, repeats, [kind])[kind]


def fio_run(d: Path, size: int, bs: int, qd: int, rw: str) -> float:
    path = d / "fio.dat"
    cmd = [
        "fio", "--name=memopt", f"--filename={path}", f"--size={size}", f"--bs={bs}",
        f"--iodepth={qd}", "--ioengine=libaio", "--direct=1", f"--rw={rw}", "--numjobs=1",
        "--output-format=json",
    ]  # fmt: skip
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    job = out["jobs"][0]["write" if rw == "write" else "read"]
    return job["bw_bytes"] / 1e9


_DS_INSTALL = ("pip install deepspeed, and apt-get install libaio-dev for its async_io op "
               "(bash scripts/setup.sh dev,bench does both, the second as root)")


def deepspeed_handle(bs: int, qd: int) -> tuple[object, str]:
    """DeepSpeed's aio handle and its label; stops the run when DeepSpeed cannot provide it."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as err:
        peer_missing("nvme_bench", "DeepSpeed aio_handle", f"deepspeed is not importable ({err})",
                     _DS_INSTALL, "--no-deepspeed")
    builder = AsyncIOBuilder()
    if not builder.is_compatible():
        peer_missing("nvme_bench", "DeepSpeed aio_handle",
                     "its async_io op is not compatible here (libaio-dev missing?)", _DS_INSTALL,
                     "--no-deepspeed")
    try:
        aio = builder.load(verbose=False)
    except Exception as err:  # the JIT build failed
        peer_missing("nvme_bench", "DeepSpeed aio_handle",
                     f"building its async_io op failed ({type(err).__name__}: {err})",
                     _DS_INSTALL, "--no-deepspeed")
    return aio.aio_handle(bs, qd, False, True, 1), "deepspeed " + _ds_version()


def _ds_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def deepspeed_run(
    h: object, d: Path, size: int, repeats: int, unlink: bool = True
) -> tuple[list[float], list[float]]:
    path = str(d / "ds.dat")
    buf = h.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))  # type: ignore[attr-defined]
    buf.random_(0, 255)
    writes, reads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        h.sync_pwrite(buf, path)  # type: ignore[attr-defined]
        writes.append(size / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        h.sync_pread(buf, path)  # type: ignore[attr-defined]
        reads.append(size / (time.perf_counter() - t0) / 1e9)
    h.free_cpu_locked_tensor(buf)  # type: ignore[attr-defined]
    if unlink:  # kept between rounds: later writes overwrite, as in ZeRO-Infinity's swap files
        os.unlink(path)
    return writes, reads


def _row(name: str, w: list[float], r: list[float]) -> str:
    return f"| {name} | {statistics.median(w):.2f} | {statistics.median(r):.2f} |"


def _ratio(a: list[float], b: list[float]) -> str:
    """Ratio of medians, then the median and the lowest of the per-round ratios (paired)."""
    pairs = [x / y for x, y in zip(a, b, strict=True)]
    return (
        f"{statistics.median(a) / statistics.median(b):.2f} "
        f"(paired {statistics.median(pairs):.2f}, min {min(pairs):.2f})"
    )


def _timed(label: str, fn: Callable[[], tuple[list[float], list[float]]]):
    t0 = time.perf_counter()
    out = fn()
    print(f"# {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def peer_tools(a: argparse.Namespace, d: Path, size: int, bs: int, qd: int) -> Peers:
    """fio and DeepSpeed as timed peers; a missing one stops the run unless ``--no-<peer>``."""
    peers: Peers = {}
    if a.no_fio:
        print(skipped("fio", "--no-fio"))
    elif shutil.which("fio"):
        peers["fio libaio"] = lambda: (
            fio_run(d, size, bs, qd, "write"), fio_run(d, size, bs, qd, "read")
        )  # fmt: skip
    else:
        peer_missing("nvme_bench", "fio", "fio is not on PATH",
                     "apt-get install -y fio (or bash scripts/setup.sh dev,bench as root)",
                     "--no-fio")
    if a.no_deepspeed:
        print(skipped("DeepSpeed aio_handle", "--no-deepspeed"))
    else:
        ds, ds_note = deepspeed_handle(bs, qd)

        def ds_turn() -> tuple[float, float]:
            w, r = deepspeed_run(ds, d, size, 1, unlink=False)
            return w[0], r[0]

        peers[ds_note + " aio_handle"] = ds_turn
    return peers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/memopt_nvme_bench")
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--block-size-kib", type=int, default=1024)
    p.add_argument("--queue-depth", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument(
        "--backends",
        default="native,native+huge,threads",
        help="memopt I/O engines to time (native:W = the native engine with W workers)",
    )
    p.add_argument("--no-fio", action="store_true", help="run without the fio peer")
    p.add_argument("--no-deepspeed", action="store_true",
                   help="run without the DeepSpeed aio_handle peer")
    a = p.parse_args()
    d = Path(a.dir)
    size, bs, qd = a.size_mib << 20, a.block_size_kib << 10, a.queue_depth
    print(f"# date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"{platform.platform()}, torch {torch.__version__}")  # fmt: skip
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# file size {a.size_mib} MiB, block {a.block_size_kib} KiB, queue depth {qd}, "
          f"O_DIRECT, dir {d}, median of {a.repeats}")  # fmt: skip
    results: dict[str, tuple[list[float], list[float]]] = {}
    kinds = a.backends.split(",")
    peers = peer_tools(a, d, size, bs, qd)  # before the directory: a missing peer stops here
    d.mkdir(parents=True, exist_ok=True)
    reqs: dict[str, tuple[list[int], list[int]]] = {}
    runs = _timed(
        "all tools",
        lambda: memopt_runs(d, size, bs, qd, a.repeats, kinds, a.warmup, peers, reqs),
    )
    (d / "fio.dat").unlink(missing_ok=True)
    labels = {name: f"memopt NVMeTier ({name})" if name in kinds else name for name in runs}
    for name, values in runs.items():
        results[labels[name]] = values
    print("\n| tool | write GB/s | read GB/s | write requests | read requests |")
    print("|---|---:|---:|---:|---:|")
    for name, (w, r) in runs.items():
        rw, rr = reqs.get(name, ([0], [0]))
        print(f"{_row(labels[name], w, r)} {statistics.median(rw):.0f} | "
              f"{statistics.median(rr):.0f} |")  # fmt: skip
    print(f"# requests: median block-layer requests per {a.size_mib} MiB written / read "
          f"({size // bs} when no request is split)")  # fmt: skip
    for me, mine in results.items():
        if not me.startswith("memopt"):
            continue
        for name, (w, r) in results.items():
            if not name.startswith("memopt"):
                print(f"# {me} / {name}: write {_ratio(mine[0], w)}x, read {_ratio(mine[1], r)}x")
    if a.sweep:
        print(
            "\n| memopt block KiB | queue depth | write GB/s | read GB/s |\n|---:|---:|---:|---:|"
        )
        for sbs in (1 << 20, 4 << 20):
            for sqd in (4, 8, 16, 32):
                w, r = memopt_run(d, size, sbs, sqd, a.repeats, a.backends.split(",")[0])
                print(f"| {sbs >> 10} | {sqd} | {statistics.median(w):.2f} | "
                      f"{statistics.median(r):.2f} |")  # fmt: skip
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
