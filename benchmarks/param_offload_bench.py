"""Stage-3 parameter offload side by side: memopt ``offload_params="nvme"`` (+ optimizer state
on NVMe) against memopt stage 3 in RAM and DeepSpeed ZeRO-3 with ``offload_param`` and
``offload_optimizer``, in one run.

Workload: ``shard_bench``'s LLaMA-60M-shaped model (hidden 512, 8 layers, 58M parameters,
fp32, random tokens), 2 ranks over gloo on the CPU, ``OMP_NUM_THREADS=1`` per rank, every
system built lazily (memopt on the meta device, DeepSpeed under ``zero.Init``: no rank ever
holds the whole model) and stepping ``torch.optim.AdamW`` (lr 1e-4). memopt's FSDP2 units:
each decoder layer, the embedding and the head (the root keeps the final norm); DeepSpeed
partitions every parameter. Configurations:

- ``memopt3``: ``memopt.shard(stage=3)``; shards, gradients and AdamW state in RAM;
- ``memopt3-nvme``: ``offload_params="nvme"``: shards in an O_DIRECT file, read ahead of
  FSDP2's gathers and streamed through the unit-by-unit step;
- ``memopt3-nvme-state``: the same plus ``offload=OffloadConfig(device="nvme")``: the AdamW
  moments of each unit on NVMe between steps;
- ``deepspeed3-offload``: ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on
  ``cpu``: DeepSpeed's NVMe swap path cannot run on a CPU-only host (its swap buffer pool
  asserts pinned buffers, which the CPU accelerator does not make), so its offload target is
  the CPU, i.e. RAM here (torch AdamW as a client optimizer, ``zero_force_ds_cpu_optimizer``
  off).

Per configuration and repeat a fresh ``torchrun --nproc-per-node 2`` runs ``--warmup`` then
``--steps`` timed steps and reports per rank the median step time, the peak RSS (VmHWM), the
RSS between steps (VmRSS after the last step) and, for memopt's NVMe configurations, the
bytes read and written per step. Those bytes of both ranks (one disk) over fio's sequential
bandwidth (``fio libaio direct=1 bs=1M iodepth=8``, measured in the same run on the same
directory) give the step's I/O time if the disk ran at fio speed with nothing overlapped: the
script prints it as a range (all bytes at the faster of fio's write and read rates, to all at
the slower), next to the measured extra step time over ``memopt3``. A run that fails is
printed with its error (a configuration with no completed run is left out of the tables), and
after the tables the script exits with status 1 (``--configs`` leaves a configuration out
explicitly).

Usage::

    python benchmarks/param_offload_bench.py --dir /path/on/nvme
    python benchmarks/param_offload_bench.py --quick        # tiny model, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _peers import exit_if_failed
from _procstat import rss_kib  # benchmarks/ is on sys.path when run as a script

CONFIGS = ("memopt3", "memopt3-nvme", "memopt3-nvme-state", "deepspeed3-offload")
MIB = 2**20


def _setup(name: str, model: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """(step function, the sharded optimizer or None)."""
    import torch

    if name.startswith("deepspeed"):
        import deepspeed

        off = {"device": "cpu", "pin_memory": False}
        ds_cfg = {"train_micro_batch_size_per_gpu": args.batch, "zero_allow_untested_optimizer":
                  True, "zero_force_ds_cpu_optimizer": False, "zero_optimization": {
                      "stage": 3, "offload_param": off, "offload_optimizer": off}}  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)

        def ds_step(x: Any) -> None:
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()

        return ds_step, None
    import memopt
    from memopt.offload import NVMeConfig, OffloadConfig
    from memopt.sharding import FSDPOptions

    kwargs: dict[str, Any] = {}
    rank = torch.distributed.get_rank()
    if name != "memopt3":
        kwargs.update(offload_params="nvme", param_nvme=f"{args.dir}/p{rank}")
    if name == "memopt3-nvme-state":
        nvme = NVMeConfig(directory=f"{args.dir}/s{rank}", capacity_bytes=64 * MIB)
        # unpinned staging on a CPU-only host (pinning buys nothing without a device)
        kwargs["offload"] = OffloadConfig(device="nvme", nvme=nvme, pin_memory=False)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    units = [*model.model.layers, model.model.embed_tokens, model.lm_head]
    fsdp = FSDPOptions(modules=units, init_fn=model._init_weights)
    model, opt = memopt.shard(model, inner, stage=3, fsdp=fsdp, **kwargs)

    def step(x: Any) -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def _io_bytes(opt: Any) -> int:
    sw, st = getattr(opt, "param_swapper", None), getattr(opt, "state_store", None)
    total = 0 if sw is None else sw.stats.bytes_read + sw.stats.bytes_written
    return total + (0 if st is None else st.bytes_read + st.bytes_written)


def _held_bytes(model: Any, opt: Any) -> int:
    """Bytes of parameter shards and optimizer state tensors in memory now (unique storages;
    a DTensor by its local shard). memopt's optimizer state keys are the holders."""
    seen: dict[int, int] = {}
    inner = getattr(opt, "inner", opt)
    tensors = [getattr(p, "_local_tensor", p) for p in model.parameters()]
    tensors += [t for st in inner.state.values() for t in st.values() if hasattr(t, "numel")]
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _trimmed_rss_kib() -> int:
    """VmRSS after glibc's ``malloc_trim(0)`` hands free heap pages back to the kernel: the
    memory the process holds live, without what the allocator kept after frees."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_kib("VmRSS")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from shard_bench import build_model

    if args.config.startswith("deepspeed"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    import transformers  # noqa: F401  (imported before the baseline)

    import memopt  # noqa: F401

    base_kib = rss_kib("VmRSS")
    lazy = "deepspeed3" if args.config.startswith("deepspeed") else "memopt3"
    model = build_model(args.quick, lazy, True)
    step, opt = _setup(args.config, model, args)
    if opt is not None:  # memopt.shard returned the (sharded) model in place
        model = opt.model
    g = torch.Generator().manual_seed(1000 + rank)
    vocab = 512 if args.quick else 32000
    times, io = [], []
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        before = _io_bytes(opt)
        t0 = time.perf_counter()
        step(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            io.append(_io_bytes(opt) - before)
    mine = {"rank": rank, "step_s": statistics.median(times), "peak_kib": rss_kib("VmHWM"),
            "rss_kib": rss_kib("VmRSS"), "base_kib": base_kib,
            "io_bytes": statistics.median(io),
            "held_bytes": _held_bytes(model, opt) if opt is not None else None,
            "trim_kib": _trimmed_rss_kib()}  # fmt: skip
    got: list[Any] = [None] * world
    dist.all_gather_object(got, mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps(got))
    from memopt.sharding import shutdown_distributed
    shutdown_distributed()


def run_one(config: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", os.path.abspath(__file__), "--worker", "--config",
               config, "--out", out, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq", str(args.seq), "--dir", tmp,
               ] + (["--quick"] if args.quick else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{config} failed (rc {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")  # fmt: skip
        ranks = json.loads(Path(out).read_text())
        print(f"  {config:19s} {time.time() - t0:6.1f} s wall: "
              + "  ".join(f"r{r['rank']} {r['step_s'] * 1e3:.0f} ms" for r in ranks),
              flush=True)  # fmt: skip
        return list(ranks)


def summarize(runs: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Median over repeats of the slower rank's step time and the larger rank's memory."""

    def med(key: Any) -> float:
        return statistics.median(max(key(r) for r in ranks) for ranks in runs)

    return {
        "step_ms": med(lambda r: r["step_s"] * 1e3),
        "peak_mib": med(lambda r: r["peak_kib"] / 1024),
        "rss_mib": med(lambda r: r["rss_kib"] / 1024),
        "delta_mib": med(lambda r: (r["peak_kib"] - r["base_kib"]) / 1024),
        "io_mib": med(lambda r: r["io_bytes"] / MIB),
        "held_mib": med(lambda r: (r["held_bytes"] or 0) / MIB),
        "trim_mib": med(lambda r: r["trim_kib"] / 1024),
    }


def tables(res: dict[str, dict[str, float]], fio: tuple[float, float] | None) -> str:
    lines = ["| configuration | step (ms) | peak RSS/rank (MiB) | peak - base (MiB) "
             "| RSS between steps (MiB) | same after malloc_trim (MiB) "
             "| shards + state held between steps (MiB) "
             "| NVMe I/O per step/rank (MiB) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in res.items():
        keys = ("step_ms", "peak_mib", "delta_mib", "rss_mib", "trim_mib")
        cells = [f"{s[k]:.0f}" for k in keys]
        held = f"{s['held_mib']:.1f}" if s["held_mib"] else "n/a"
        lines.append(f"| {name} | {' | '.join(cells)} | {held} | {s['io_mib']:.0f} |")
    lines += ["", "| configuration | step / memopt3 | peak-base / memopt3 "
              "| step / deepspeed3-offload | peak-base / deepspeed3-offload |",
              "|---|---|---|---|---|"]  # fmt: skip
    ram, ds = res.get("memopt3"), res.get("deepspeed3-offload")
    for name, s in res.items():
        cells = []
        for ref in (ram, ds):
            for k in ("step_ms", "delta_mib"):
                cells.append(f"{s[k] / ref[k]:.2f}" if ref else "")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    if fio is not None:
        lines += ["", f"fio on --dir: write {fio[0]:.2f} GB/s, read {fio[1]:.2f} GB/s"]
        lines += io_bound(res, fio)
    return "\n".join(lines)


def io_bound(res: dict[str, dict[str, float]], fio: tuple[float, float]) -> list[str]:
    """Per NVMe configuration: the disk time its per-step bytes take at fio's rates."""
    lines, ram = [], res.get("memopt3")
    for name, s in res.items():
        if not s["io_mib"]:
            continue
        nbytes = 2 * s["io_mib"] * MIB  # both ranks' bytes go to the one disk
        fast, slow = nbytes / (max(fio) * 1e9), nbytes / (min(fio) * 1e9)
        extra = ("" if ram is None else "; measured extra step time over memopt3 "
                 f"{(s['step_ms'] - ram['step_ms']) / 1e3:.2f} s")
        lines.append(f"{name}: I/O bound {fast:.3f}-{slow:.3f} s of disk time per step "
                     f"(2 ranks x {s['io_mib']:.0f} MiB at fio's faster to its slower rate)"
                     f"{extra}")
    return lines


def fio_bw(directory: str, quick: bool) -> tuple[float, float] | None:
    from nvme_bench import fio_run

    try:
        size = (64 if quick else 512) * MIB
        d = Path(directory)
        return fio_run(d, size, MIB, 8, "write"), fio_run(d, size, MIB, 8, "read")
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"fio not measured ({err}): the I/O bound is not computed "
              "(apt-get install -y fio)")
        return None
    finally:
        (Path(directory) / "fio.dat").unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--dir", default=None, help="a directory on the NVMe disk (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps: a smoke test")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from shard_bench import header

    if args.quick:
        args.steps, args.warmup, args.repeats, args.seq = 2, 1, 1, 16
    own_dir = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="memopt-pob-", dir="/var/tmp")
    configs = [c for c in args.configs.split(",") if c]
    print(header(args), flush=True)
    print(f"directory: {args.dir}", flush=True)
    runs: dict[str, list[list[dict[str, Any]]]] = {c: [] for c in configs}
    failed: list[str] = []
    for rep in range(args.repeats):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        print(f"repeat {rep + 1}/{args.repeats}: {' '.join(order)}", flush=True)
        for c in order:
            try:
                runs[c].append(run_one(c, args))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if c not in failed:
                    failed.append(c)
                print(f"  {c} FAILED: {str(exc)[-1500:]}", flush=True)
    fio = fio_bw(args.dir, args.quick)
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    res = {c: summarize(r) for c, r in runs.items() if r}
    print()
    print(tables(res, fio))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": res, "runs": runs, "fio": fio}))
    if own_dir:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
    exit_if_failed("param_offload_bench", failed)


if __name__ == "__main__":
    main()
