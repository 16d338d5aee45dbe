"""In-memory peer redundancy (REFT): host memory and time of replication vs k + m erasure coding.

Spawns W gloo ranks on this machine (default 4). Each rank holds a snapshot of ``--mb`` MB
(random fp32 tensors, a different size per rank within 10%). For each configuration
(replicate copies=1 and 2; erasure k=3+m=1 and k=2+m=2, own="reference") every rank calls
``PeerRedundancy.protect`` (timed, median of ``--repeats``), then rank 1 is replaced by an
empty instance (and, for m=2 / copies=2, rank 2 as well) and ``rebuild`` brings its snapshot
back from the peers (timed); the rebuilt tensors are checked with ``torch.equal``.

Reported per configuration: ranks it survives, host bytes held for redundancy by all ranks as
a multiple of all their snapshots (replication: ``copies``; erasure: ``m / k``), protect and rebuild
seconds and the rebuild rate (rebuilt bytes / s). Loopback gloo on a shared 2-core machine:
the times are an upper bound of the encoding and copy cost, not of a network.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memopt.checkpoint.redundancy import PeerRedundancy, RedundancyConfig

CONFIGS = [
    ("replicate copies=1", RedundancyConfig(mode="replicate", copies=1), [1]),
    ("replicate copies=2", RedundancyConfig(mode="replicate", copies=2), [1, 2]),
    ("erasure k=3 m=1", RedundancyConfig(mode="erasure", k=3, m=1, own="reference"), [1]),
    ("erasure k=2 m=2", RedundancyConfig(mode="erasure", k=2, m=2, own="reference"), [1, 2]),
]


def snapshot(rank: int, mb: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    n = int(mb * 1e6 / 4 * (1 + 0.03 * rank))
    return {f"t{i}": torch.randn(n // 4, generator=g) for i in range(4)}


def rank_main(rank: int, world: int, store: str, mb: float, repeats: int, q: mp.Queue) -> None:
    torch.set_num_threads(1)
    s = dist.FileStore(store, world)
    dist.init_process_group("gloo", store=s, rank=rank, world_size=world, timeout=timedelta(600))
    mine = snapshot(rank, mb)
    snap_bytes = sum(t.numel() * 4 for t in mine.values())
    rows = []
    for name, cfg, lost in CONFIGS:
        if cfg.group_size_error(world):
            continue
        red = PeerRedundancy(cfg)
        times = []
        for r in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            red.protect(r, mine, {"rank": rank})
            times.append(time.perf_counter() - t0)
        held = red.memory_bytes()
        if rank in lost:
            red = PeerRedundancy(cfg)
        dist.barrier()
        t0 = time.perf_counter()
        got = red.rebuild(lost)
        rebuild_s = time.perf_counter() - t0
        ok = got is None or all(torch.equal(got.tensors[k], v) for k, v in mine.items())
        rows.append((name, len(lost), held, statistics.median(times), rebuild_s, ok))
    q.put((rank, snap_bytes, rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--mb", type=float, default=100.0, help="snapshot MB per rank")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="ckpt_red_"), "store")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [
        ctx.Process(target=rank_main, args=(r, args.world, store, args.mb, args.repeats, q))
        for r in range(args.world)
    ]
    for p in procs:
        p.start()
    results = dict((r, (b, rows)) for r, b, rows in (q.get(timeout=1800) for _ in procs))
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a rank failed (exit code {p.exitcode})")
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.world} "
          f"gloo ranks on {os.cpu_count()} cores; ~{args.mb:.0f} MB snapshot per rank; protect "
          f"median of {args.repeats}")  # fmt: skip
    print("| config | survives lost ranks | held (x snapshots) | protect s | "
          "rebuild s | rebuild MB/s | bit-exact |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for i, (name, n_lost, _, _, _, _) in enumerate(results[0][1]):
        rows = [results[r][1][i] for r in range(args.world)]
        held = sum(row[2] for row in rows) / sum(results[r][0] for r in range(args.world))
        protect = max(row[3] for row in rows)  # the collective ends with its slowest rank
        rebuild = max(row[4] for row in rows)
        lost_bytes = sum(results[r][0] for r in (1, 2)[:n_lost])
        exact = all(row[5] for row in rows)
        print(f"| {name} | {n_lost} | {held:.2f} | {protect:.2f} | {rebuild:.2f} | "
              f"{lost_bytes / rebuild / 1e6:.0f} | {exact} |")  # fmt: skip
        if not exact:
            raise SystemExit(f"{name}: a rebuilt snapshot differs from the original")


if __name__ == "__main__":
    main()
