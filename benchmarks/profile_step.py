"""Where an optimizer step's time goes: host (Python + launches) against device kernels.

Builds the weight matrices of ``--blocks`` LLaMA blocks (shapes as in optim_bench.py),
warms each named optimizer up past its first refresh, then profiles ``--steps`` steady
steps with torch.profiler and prints, per optimizer: wall ms per step, the summed device
kernel time per step (on a GPU), the number of operator calls per step, and the top
operators by self CPU and by device time. Wall far above kernel time means the step is
bound by the host (launch count), not by memory or math.

    python benchmarks/profile_step.py --device cuda --size 350m --blocks 24 \\
        --only "memopt APOLLO,apollo-torch APOLLO"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # memopt from this checkout
import optim_bench as ob  # noqa: E402


def profile_one(spec: ob.Spec, weights: list, pool: list, rank: int, args) -> str:
    params = ob.fresh_params(weights)
    opt = spec.build(params, rank, 10**6)  # no refresh inside the profiled window
    run = ob.Run(spec, params, opt, 0)
    for t in range(3):
        ob.step_with(run, pool[t % len(pool)])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ob.DEVICE.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for t in range(args.steps):
            ob.step_with(run, pool[t % len(pool)])
        wall = (time.perf_counter() - t0) / args.steps * 1e3
    ev = prof.key_averages()
    n = args.steps
    dev_attr = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else (
        "self_cuda_time_total")
    kernels = [e for e in ev if e.device_type != torch.autograd.DeviceType.CPU]
    kernel_ms = sum(getattr(e, dev_attr, 0) for e in kernels) / 1e3 / n
    calls = sum(e.count for e in ev if e.key.startswith("aten::")) / n
    by_cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
    by_dev = sorted(kernels, key=lambda e: -getattr(e, dev_attr, 0))[:6]
    lines = [f"### {spec.name}: wall {wall:.2f} ms/step, device kernels {kernel_ms:.2f} ms/step, "
             f"{calls:.0f} aten calls/step ({calls / len(params):.1f} per matrix)",
             "top self CPU (ms/step): " + ", ".join(
                 f"{e.key} {e.self_cpu_time_total / 1e3 / n:.2f} (x{e.count // n})"
                 for e in by_cpu)]
    if ob.DEVICE.type == "cuda":
        lines.append("top device (ms/step): " + ", ".join(
            f"{e.key[:60]} {getattr(e, dev_attr) / 1e3 / n:.2f}" for e in by_dev))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="60m", choices=sorted(ob.SIZES))
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", default="memopt APOLLO,apollo-torch APOLLO,memopt AdamW,"
                    "torch AdamW (fused)", help="comma list of exact optimizer names")
    args = ap.parse_args(argv)
    ob.DEVICE = torch.device(args.device)
    cfg = ob.SIZES[args.size]
    shapes = [s for _, s in ob.block_shapes(cfg["hidden"], cfg["inter"])] * args.blocks
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=gen) * 0.02).to(ob.DEVICE) for s in shapes]
    pool = ob.make_grad_pool(shapes, 2, 1)
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    specs = [s for s in ob.SPECS if s.name in names]
    missing = set(names) - {s.name for s in specs}
    if missing:
        raise SystemExit(f"unknown optimizer names {sorted(missing)}; known: "
                         f"{[s.name for s in ob.SPECS]}")
    print(f"LLaMA-{args.size} x {args.blocks} blocks ({len(shapes)} matrices), {ob.DEVICE}")
    for spec in specs:
        print(profile_one(spec, weights, pool, cfg["rank"], args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
