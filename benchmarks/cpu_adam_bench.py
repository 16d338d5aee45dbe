"""CPU AdamW step on 50-200M fp32 parameters: memopt's native kernel against its peers.

Contenders, all on the same parameter and gradient tensors (each keeps its own moments):

- ``memopt``: ``memopt.offload.cpu_adam.cpu_adamw_step_`` (native kernel, the ISA it picks);
- ``memopt+bf16``: the same with the fused bf16 copy-back of the updated parameters;
- ``torch fused``: ``torch.optim.AdamW(fused=True)`` (torch's vectorised CPU kernel), and
  ``torch fused+bf16 copy_``: the same followed by ``out.copy_(p)``, the unfused copy-back;
- ``DeepSpeedCPUAdam``: DeepSpeed's AVX kernel (``pip install deepspeed ninja``; the first
  construction JIT-builds the op, about 90 s, cached afterwards), skipped if not importable;

and the memory-bandwidth yardsticks, measured in the same run on arrays of the same size:
``copy`` (b <- a: 8 B/element counted), ``triad`` (a <- b + s c: 12 B), ``add_`` (a += b:
12 B, in place like Adam, so no write-allocate traffic beyond what is counted).

Every repetition runs each contender once, in a fresh random order (the machine is shared:
interleaving spreads other jobs' load over all of them), and the table reports medians,
plus paired ratios: per repetition t(peer) / t(contender), median and quartiles over the
repetitions (> 1: the contender is faster; the quartiles show how far noise moves it).
Adam moves 28 B per parameter (read p, g, m, v; write p, m, v; +2 B for the bf16 copy,
counted as 2 B for both bf16 rows although the unfused one reads p a second time);
"of bw" is that rate over the best yardstick, the bound a streaming kernel can reach here.

    python benchmarks/cpu_adam_bench.py [--sizes 50e6,100e6,200e6] [--reps 15] [--no-deepspeed]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from memopt.offload import cpu_adam

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memopt_step(p: torch.Tensor, g: torch.Tensor, lowp: bool) -> Callable[[], object]:
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    out = torch.empty(p.shape, dtype=torch.bfloat16) if lowp else None
    state = {"t": 0}

    def run() -> object:
        state["t"] += 1
        b1, b2 = HP["betas"]
        return cpu_adam.cpu_adamw_step_(
            p, g, m, v, step=state["t"], lr=HP["lr"], beta1=b1, beta2=b2, eps=HP["eps"],
            weight_decay=HP["weight_decay"], eps_mode="torch", out_lowp=out,
        )  # fmt: skip

    return run


def torch_fused_step(param: torch.nn.Parameter, lowp: bool = False) -> Callable[[], object]:
    opt = torch.optim.AdamW([param], fused=True, **HP)  # type: ignore[arg-type]
    if not lowp:
        return opt.step
    out = torch.empty(param.shape, dtype=torch.bfloat16)

    def run() -> object:
        opt.step()
        return out.copy_(param.detach())

    return run


def deepspeed_step(param: torch.nn.Parameter) -> Callable[[], object] | None:
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # not installed, or its op failed to build
        print(f"[bench] DeepSpeedCPUAdam unavailable: {exc}", file=sys.stderr)
        return None
    t0 = time.perf_counter()
    opt = DeepSpeedCPUAdam([param], adamw_mode=True, fp32_optimizer_states=True, **HP)
    print(f"[bench] DeepSpeedCPUAdam ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return opt.step


def yardsticks(n: int) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (function, bytes it moves) for the bandwidth references."""
    a, b, c = torch.randn(n), torch.randn(n), torch.randn(n)
    return {
        "copy": (lambda: a.copy_(b), 8 * n),
        "triad": (lambda: torch.add(b, c, alpha=0.5, out=a), 12 * n),
        "add_": (lambda: a.add_(b), 12 * n),
    }


def measure(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved in a random order per repetition."""
    for fn in fns.values():  # warm-up: first touch of the state pages, DS's lazy state
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(reps):
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired(times: dict[str, list[float]], ref: str, name: str) -> str:
    """Median and quartiles over repetitions of t(ref) / t(name) within the same repetition:
    the speed ratio with the machine's slow drift (other jobs) cancelled pairwise."""
    q = statistics.quantiles([a / b for a, b in zip(times[ref], times[name], strict=True)], n=4)
    return f"{q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def run_size(n: int, reps: int, use_ds: bool) -> list[str]:
    p, g = torch.randn(n), torch.randn(n) * 1e-2
    param = torch.nn.Parameter(p)
    param.grad = g
    fns: dict[str, Callable[[], object]] = {
        "memopt": memopt_step(p, g, lowp=False),
        "memopt+bf16": memopt_step(p, g, lowp=True),
        "torch fused": torch_fused_step(param),
        "torch fused+bf16 copy_": torch_fused_step(param, lowp=True),
    }
    ds = deepspeed_step(param) if use_ds else None
    if ds is not None:
        fns["DeepSpeedCPUAdam"] = ds
    refs = yardsticks(n)
    times = measure({**fns, **{k: f for k, (f, _) in refs.items()}}, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    bw = {k: nbytes / med[k] for k, (_, nbytes) in refs.items()}
    best = max(bw.values())
    rows = []
    for name in fns:
        nbytes = (30 if "bf16" in name else 28) * n
        rate = nbytes / med[name]
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        vs_torch = med["torch fused"] / med[name]
        vs_ds = paired(times, "DeepSpeedCPUAdam", name) if ds is not None else "n/a"
        rows.append(
            f"| {n / 1e6:.0f}M | {name} | {med[name] * 1e3:.1f} | {spread} | "
            f"{rate / 1e9:.1f} | {rate / best:.2f} | {vs_torch:.2f}x | "
            f"{paired(times, 'torch fused', name)} | {vs_ds} |"
        )
    refs_txt = ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items())
    rows.append(f"| {n / 1e6:.0f}M | yardsticks (median) | | | {refs_txt} | | | | |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="50e6,100e6,200e6", help="parameter counts, comma-separated")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# cpu_adam_bench: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, native={cpu_adam.native_available()} "
        f"isa={cpu_adam.selected_isa()} openmp={cpu_adam.has_openmp()}, "
        f"load average at start {os.getloadavg()[0]:.1f}, reps {args.reps}"
    )
    print(
        "| params | step | median ms | min-max ms | GB/s | of bw | speed vs torch "
        "| paired vs torch [IQR] | paired vs DeepSpeed [IQR] |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for row in run_size(int(float(size)), args.reps, not args.no_deepspeed):
            print(row, flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
