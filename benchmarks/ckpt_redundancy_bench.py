"""In-memory peer redundancy (REFT): host memory and time of replication vs k + m erasure coding.

Spawns W gloo ranks on this machine (default 4). Each rank holds a snapshot of ``--mb`` MB
(random fp32 tensors, a different size per rank within 10%). For each configuration
(replicate copies=1 and 2; erasure k=3+m=1 and k=2+m=2, own="reference") every rank calls
``PeerRedundancy.protect`` (timed, median of ``--repeats``), then rank 1 is replaced by an
empty instance (and, for m=2 / copies=2, rank 2 as well) and ``rebuild`` brings its snapshot
back from the peers (timed); "bit-exact" means every lost rank got its tensors back equal
(``torch.equal``) and every other rank got None.

Reported per configuration: ranks it survives, host bytes held for redundancy by all ranks as
a multiple of all their snapshots (replication: ``copies``; erasure: ``m / k``), protect and rebuild
seconds and the rebuild rate (rebuilt bytes / s). Loopback gloo on a shared 2-core machine:
the times are an upper bound of the encoding and copy cost, not of a network.

``--checkpointer``: the same tier inside ``AsyncCheckpointer(redundancy=...)`` during training.
W ranks train an MLP of ``--params-m`` million parameters under ``memopt.shard(stage=2,
layout="dim0")`` with AdamW. Configurations (no checkpoint, plain ``AsyncCheckpointer``,
+ ``replicate copies=1``, + ``erasure k=W-1, m=1``) take turns in ``--rounds`` rounds of
``--every`` steps with a save after the first step of each (drained, untimed, at the end of
its block), so load drift on a shared machine hits all of them alike.
Reported per configuration (slowest rank, rounds after the first): the stall per save
(``SaveRecord.stall_s``: what the training loop waited), the mean step time against the run
without checkpoints (background copies compete for the cores), the time to durable and to
protected (from the ``save`` call), how many saves peers hold, and the host bytes of the tier.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

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


def rebuilt_ok(was_lost: bool, got: Any, mine: dict[str, torch.Tensor]) -> bool:
    """A lost rank got its snapshot back, tensor for tensor; any other rank got None."""
    if not was_lost:
        return got is None
    return got is not None and set(got.tensors) == set(mine) and all(
        torch.equal(got.tensors[k], v) for k, v in mine.items())


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
        ok = rebuilt_ok(rank in lost, got, mine)
        rows.append((name, len(lost), held, statistics.median(times), rebuild_s, ok))
    q.put((rank, snap_bytes, rows))
    from memopt.sharding import shutdown_distributed
    shutdown_distributed()


def _block(model: Any, opt: Any, x: torch.Tensor, steps: int, ck: Any, step0: int) -> float:
    """``steps`` training steps, a save after the first (its background work overlaps the rest);
    returns the mean step time. The save is drained after the timed steps."""
    t0 = time.perf_counter()
    for step in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ck is not None and step == 0:
            ck.save(step0, model=model, optimizer=opt)
    out = (time.perf_counter() - t0) / steps
    if ck is not None:
        ck.wait()
    return out


def ckpt_main(rank: int, world: int, store: str, args: Any, root: str, q: Any) -> None:
    import memopt
    from memopt.checkpoint import AsyncCheckpointer

    torch.set_num_threads(1)
    s = dist.FileStore(store, world)
    dist.init_process_group("gloo", store=s, rank=rank, world_size=world, timeout=timedelta(600))
    d = 1024
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(max(1, int(args.params_m / 1.05)))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, opt = memopt.shard(model, opt, stage=2, layout="dim0")
    x = torch.randn(args.batch, d)
    _block(model, opt, x, 2, None, 0)  # warm-up (allocations, first optimizer state)
    configs = [
        ("no checkpoint", None),
        ("AsyncCheckpointer", None),
        ("+ replicate copies=1", RedundancyConfig(mode="replicate", copies=1)),
        (f"+ erasure k={world - 1} m=1", RedundancyConfig(mode="erasure", k=world - 1, m=1)),
    ]
    cks = [None] + [
        AsyncCheckpointer(os.path.join(root, f"c{i}"), keep=2, redundancy=cfg)
        for i, (_, cfg) in enumerate(configs[1:], 1)
    ]
    times: list[list[float]] = [[] for _ in configs]
    for r in range(args.rounds):  # configurations interleaved: load drift hits all alike
        for i, ck in enumerate(cks):
            dist.barrier()
            times[i].append(_block(model, opt, x, args.every, ck, r))
    rows = [(configs[0][0], statistics.mean(times[0][1:]), (0.0, 0.0), 0.0, 0.0, 0, 0, 0, 0)]
    for i, ck in enumerate(cks[1:], 1):
        assert ck is not None
        recs = ck.stats.records[1:]  # the first save pays the page faults of new buffers
        held = 0 if ck.peers is None else ck.peers.memory_bytes()
        ck.close()
        rows.append((configs[i][0], statistics.mean(times[i][1:]),
                     (statistics.median(r.stall_s for r in recs), max(r.stall_s for r in recs)),
                     statistics.median(r.durable_s for r in recs),
                     statistics.median([r.protected_s for r in recs if r.protected] or [0.0]),
                     sum(r.protected for r in recs), len(recs), recs[-1].nbytes, held))  # fmt: skip
    q.put((rank, rows))
    from memopt.sharding import shutdown_distributed
    shutdown_distributed()


def ckpt_report(args: Any, results: dict[int, list[Any]]) -> None:
    load = os.getloadavg()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.world} "
          f"gloo ranks on {os.cpu_count()} cores; load average {load[0]:.1f} {load[1]:.1f}; "
          f"{args.params_m:.0f}M-parameter MLP, ZeRO-2 dim0, AdamW; {args.rounds} rounds of "
          f"{args.every} steps per config, a save in each, configs interleaved; slowest rank, "
          "rounds after the first")  # fmt: skip
    print(
        "| config | stall ms/save median (max) | step s (x none) | durable s | protected s | "
        "protected saves | file MB (rank 0) | tier MB (all ranks) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    base = max(results[r][0][1] for r in results)
    for i, row0 in enumerate(results[0]):
        rows = [results[r][i] for r in results]
        step = max(r[1] for r in rows)
        prot = min(r[5] for r in rows)
        stall = max(r[2][0] for r in rows) * 1e3, max(r[2][1] for r in rows) * 1e3
        print(f"| {row0[0]} | {stall[0]:.1f} ({stall[1]:.0f}) | {step:.3f} "
              f"({step / base:.2f}) | {max(r[3] for r in rows):.2f} | "
              f"{max(r[4] for r in rows):.2f} | {prot}/{row0[6]} | {row0[7] / 1e6:.0f} | "
              f"{sum(r[8] for r in rows) / 1e6:.0f} |")  # fmt: skip


def ckpt_bench(args: Any) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    root = tempfile.mkdtemp(prefix="ckpt_reft_", dir=args.dir)
    store = os.path.join(root, "store")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=ckpt_main, args=(r, args.world, store, args, root, q))
             for r in range(args.world)]  # fmt: skip
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    shutil.rmtree(root, ignore_errors=True)
    ckpt_report(args, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--mb", type=float, default=100.0, help="snapshot MB per rank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpointer", action="store_true", help="AsyncCheckpointer rows")
    ap.add_argument("--params-m", type=float, default=20.0, help="--checkpointer: millions")
    ap.add_argument("--rounds", type=int, default=8, help="--checkpointer: saves per config")
    ap.add_argument("--every", type=int, default=6, help="--checkpointer: steps per save")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dir", default=None, help="--checkpointer: directory for the snapshots")
    args = ap.parse_args()
    if args.checkpointer:
        ckpt_bench(args)
        return
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="ckpt_red_") as tmp:  # the rendezvous file
        store = os.path.join(tmp, "store")
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
