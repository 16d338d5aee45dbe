"""Optimizer state offload end to end: step time against the I/O bound, peak RSS against DeepSpeed.

One ~100M-parameter LLaMA-shaped model (hidden 768, 8 layers, vocab 32000: 106M), bf16
parameters with fp32 master weights, trained for a few steps on random tokens, one process per
configuration (``torch.distributed.run``, 1 rank, gloo), each run in the same invocation:

- ``memopt-nvme``: ``memopt.shard(model, AdamW, stage=2, offload=OffloadConfig("nvme", ...))``:
  master + moments (12 B/param) on the NVMe tier, streamed through the pipeline each step.
- ``memopt-cpu``: the same on the pinned CPU tier (in place, no streaming).
- ``deepspeed-cpu``: DeepSpeed ZeRO-2 with ``offload_optimizer: {device: cpu}`` (its
  DeepSpeedCPUAdam), ``bf16`` enabled: the peer for host memory (MemAscend's measure).

**I/O bound** (memopt-nvme): bytes the optimizer step moved (tier reads + writes, from the
pipeline's counters) over fio's sequential bandwidth in the same directory, measured in this
run right before and right after it (the better of the two for each direction: the strictest
bound on a disk shared with other jobs). fio writes then reads one 1 GiB file (256 MiB with
``--quick``), whatever the step moves (1.27 GB per direction on the default model):
``ioengine=libaio, direct=1``, 1 MiB blocks, queue depth 8 (the tier's defaults). The bound:
``read_bytes / fio_read + write_bytes / fio_write`` (one disk serves both), and the
overlapped bound ``max(read, write)``. Target: optimizer step within 1.3x of it. Without
fio the script stops (exit status 1) unless ``--no-fio`` is given; the bound is then not
computed. **Peak RSS**: ``VmHWM`` of each process, and the same minus
the RSS after imports (the training memory). Target: memopt at least 30% below DeepSpeed.

    .venv/bin/python benchmarks/offload_bench.py --dir runs/offload --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _peers import peer_missing, skipped
from _procstat import rss_kib  # benchmarks/ is on sys.path when run as a script

CONFIGS = ("memopt-nvme", "memopt-cpu", "deepspeed-cpu")
GB = 1e9


def build_model(quick: bool) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 512}
        if quick
        else {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
              "vocab_size": 32000}
    )  # fmt: skip
    cfg = LlamaConfig(num_attention_heads=12 if not quick else 4, max_position_embeddings=512,
                      tie_word_embeddings=False, **size)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _setup(args: argparse.Namespace, model: Any) -> tuple[Any, Any, Any]:
    """(train step returning (fwd+bwd s, optimizer s), optimizer, offloaded store or None)."""
    import torch

    if args.config == "deepspeed-cpu":
        import deepspeed

        ds_cfg = {
            "train_micro_batch_size_per_gpu": args.batch,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                    "pin_memory": True}},
        }  # fmt: skip
        engine, opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_cfg
        )

        def ds_step(x: Any) -> tuple[float, float]:
            t0 = time.perf_counter()
            engine.backward(engine(input_ids=x, labels=x).loss)
            t1 = time.perf_counter()
            engine.step()
            return t1 - t0, time.perf_counter() - t1

        return ds_step, opt, None
    import memopt
    from memopt.offload import OffloadConfig

    device = args.config.split("-")[1]
    off = OffloadConfig(device, nvme_path=args.dir if device == "nvme" else None)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model, opt = memopt.shard(model, inner, stage=2, offload=off)

    def step(x: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1

    return step, opt, opt.inner.store


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    if args.config.startswith("deepspeed"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (imported before the baseline: not training memory)

    import memopt  # noqa: F401

    base_kib = rss_kib("VmRSS")
    model = build_model(args.quick)
    n_params = sum(p.numel() for p in model.parameters())
    step, _opt, store = _setup(args, model)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    fb, op, io = [], [], []
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        if store is not None:
            store.stats.io_wait_s = 0.0
        a, b = step(x)
        if i >= args.warmup:
            fb.append(a)
            op.append(b)
            io.append(store.stats.io_wait_s if store is not None else 0.0)
    out = {
        "config": args.config,
        "params": n_params,
        "fwd_bwd_s": statistics.median(fb),
        "opt_s": statistics.median(op),
        "io_wait_s": statistics.median(io),
        "peak_kib": rss_kib("VmHWM"),
        "base_kib": base_kib,
    }
    if store is not None:
        st = store.stats
        out["read_per_step"] = st.bytes_read / st.steps
        out["write_per_step"] = st.bytes_written / st.steps
        out["groups"], out["state_bytes"] = len(st.groups), store.nbytes()
    with open(args.out, "w") as f:
        json.dump(out, f)
    from memopt.sharding import shutdown_distributed
    shutdown_distributed()


# -- driver ------------------------------------------------------------------------------------
def fio(d: Path, size: int, bs: int, qd: int, rw: str) -> float:
    path = d / "fio.dat"
    cmd = ["fio", "--name=offload", f"--filename={path}", f"--size={size}", f"--bs={bs}",
           f"--iodepth={qd}", "--ioengine=libaio", "--direct=1", f"--rw={rw}", "--numjobs=1",
           "--output-format=json"]  # fmt: skip
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return res["jobs"][0]["write" if rw == "write" else "read"]["bw_bytes"]


def run_one(config: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", os.path.abspath(__file__), "--worker", "--config",
               config, "--out", out, "--dir", str(args.dir)]  # fmt: skip
        for k in ("steps", "warmup", "batch", "seq", "threads"):
            cmd += [f"--{k}", str(getattr(args, k))]
        cmd += ["--quick"] if args.quick else []
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu"}
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{config} failed (rc {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")  # fmt: skip
        with open(out) as f:
            res = json.load(f)
    print(f"  {config:14s} {time.time() - t0:6.1f} s wall: {res}", flush=True)
    return res


def report(res: dict[str, dict[str, Any]], bw: dict[str, float]) -> str:
    lines = ["| config | params | fwd+bwd s | optimizer step s | I/O wait s | peak RSS GiB "
             "| peak - baseline GiB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in res.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.0f}M | {r['fwd_bwd_s']:.2f} | {r['opt_s']:.2f} | "
            f"{r['io_wait_s']:.2f} | {r['peak_kib'] / 2**20:.2f} | "
            f"{(r['peak_kib'] - r['base_kib']) / 2**20:.2f} |"
        )
    nv = res.get("memopt-nvme")
    if nv and bw:
        r, w = nv["read_per_step"] / bw["read"], nv["write_per_step"] / bw["write"]
        bound = r + w
        lines += ["", f"NVMe step moves {nv['read_per_step'] / GB:.2f} GB read + "
                  f"{nv['write_per_step'] / GB:.2f} GB written ({nv['groups']} groups); fio "
                  f"{bw['read'] / GB:.2f} GB/s read, {bw['write'] / GB:.2f} GB/s write -> I/O "
                  f"bound {bound:.2f} s; optimizer step {nv['opt_s']:.2f} s = "
                  f"{nv['opt_s'] / bound:.2f}x the bound (target <= 1.3x); "
                  f"{nv['opt_s'] / max(r, w):.2f}x the overlapped bound "
                  f"{max(r, w):.2f} s"]  # fmt: skip
    ds = res.get("deepspeed-cpu")
    for name in ("memopt-cpu", "memopt-nvme"):
        r = res.get(name)
        if r and ds:
            peak = 1 - r["peak_kib"] / ds["peak_kib"]
            train = 1 - (r["peak_kib"] - r["base_kib"]) / (ds["peak_kib"] - ds["base_kib"])
            lines.append(f"{name} peak RSS {peak:+.0%} lower than deepspeed-cpu "
                         f"(training memory {train:+.0%}; target >= 30%)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="memopt-nvme")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default="")
    p.add_argument("--dir", type=Path, default=Path("runs/offload"),
                   help="a directory on the disk under test (O_DIRECT)")  # fmt: skip
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    p.add_argument("--no-fio", action="store_true", help="run without fio: no I/O bound")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.no_fio:
        print(skipped("fio", "--no-fio") + " (no I/O bound)")
    elif "memopt-nvme" in args.configs.split(",") and not shutil.which("fio"):
        peer_missing("offload_bench", "fio", "fio is not on PATH (the I/O bound is measured "
                     "with it)", "apt-get install -y fio (or bash scripts/setup.sh dev,bench "
                     "as root)", "--no-fio")
    args.dir.mkdir(parents=True, exist_ok=True)
    bw: dict[str, float] = {}
    res = {}
    for c in args.configs.split(","):
        if c == "memopt-nvme" and not args.no_fio:  # fio before and after: the better is used
            bw = _fio_pair(args, bw)
            res[c] = run_one(c, args)
            bw = _fio_pair(args, bw)
        else:
            res[c] = run_one(c, args)
    print(report(res, bw))


def _fio_pair(args: argparse.Namespace, best: dict[str, float]) -> dict[str, float]:
    """fio write + read on a 1 GiB file in ``--dir``; keeps the best of each seen so far."""
    size = 256 << 20 if args.quick else 1 << 30
    now = {rw: fio(args.dir, size, 1 << 20, 8, rw) for rw in ("write", "read")}
    (args.dir / "fio.dat").unlink(missing_ok=True)
    print(f"  fio: {now['write'] / GB:.2f} GB/s write, {now['read'] / GB:.2f} GB/s read")
    return {rw: max(best.get(rw, 0.0), now[rw]) for rw in now}


if __name__ == "__main__":
    main()
