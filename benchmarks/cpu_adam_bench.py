"""CPU AdamW step on 50-200M fp32 parameters: memopt's native kernel against its peers.

Contenders, all on the same parameter and gradient tensors (each keeps its own moments):

- ``memopt``: ``memopt.offload.cpu_adam.cpu_adamw_step_`` (native kernel, the ISA it picks);
- ``memopt+bf16``: the same with the fused bf16 copy-back of the updated parameters;
- ``torch fused``: ``torch.optim.AdamW(fused=True)`` (torch's vectorised CPU kernel), and
  ``torch fused+bf16 copy_``: the same followed by ``out.copy_(p)``, the unfused copy-back;
- ``DeepSpeedCPUAdam``: DeepSpeed's AVX kernel (``pip install deepspeed ninja``; the first
  construction JIT-builds the op, about 90 s, cached afterwards), and
  ``DeepSpeedCPUAdam+bf16 copy_`` (its CPU Adam has no fused low-precision copy). When it
  cannot be imported or built the script stops with exit status 1, unless ``--no-deepspeed``
  leaves it out (the output then says so);

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
        [--placement] [--cpu-time]

``--placement`` adds memopt on differently placed moments (THP-backed, and torch's own state
tensors); ``--cpu-time`` runs 1 thread timed by thread CPU time (``time.thread_time``), which
removes the time the shared machine's other jobs hold the core and leaves the loop's speed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _peers import peer_missing, skipped  # benchmarks/ is on sys.path when run as a script

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


def thp_zeros(n: int, keep: list) -> torch.Tensor:
    """n fp32 zeros in an anonymous mapping aligned to 2 MiB with MADV_HUGEPAGE (Linux), so
    transparent huge pages back them even when THP is in "madvise" mode."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    huge, nbytes = 2 << 20, 4 * n
    raw = libc.mmap(None, nbytes + huge, 3, 0x22, -1, 0)  # PROT_READ|WRITE, PRIVATE|ANON
    if raw in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    ptr = (raw + huge - 1) // huge * huge
    libc.madvise(ptr, (nbytes + huge - 1) // huge * huge, 14)  # MADV_HUGEPAGE
    buf = (ctypes.c_char * nbytes).from_address(ptr)
    keep.append(buf)  # the mapping lives as long as the benchmark
    return torch.frombuffer(buf, dtype=torch.float32).zero_()


def memopt_step(
    p: torch.Tensor,
    g: torch.Tensor,
    lowp: bool,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Callable[[], object]:
    m, v = moments or (torch.zeros_like(p), torch.zeros_like(p))
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
    return with_bf16_copy(opt.step, param) if lowp else opt.step


def with_bf16_copy(step: Callable[[], object], param: torch.nn.Parameter) -> Callable[[], object]:
    """``step`` followed by the unfused copy-back of the updated parameters to bf16."""
    out = torch.empty(param.shape, dtype=torch.bfloat16)

    def run() -> object:
        step()
        return out.copy_(param.detach())

    return run


def deepspeed_step(param: torch.nn.Parameter) -> Callable[[], object]:
    """DeepSpeedCPUAdam's step on ``param``; stops the run when DeepSpeed cannot provide it."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        t0 = time.perf_counter()
        opt = DeepSpeedCPUAdam([param], adamw_mode=True, fp32_optimizer_states=True, **HP)
    except Exception as exc:  # not installed, or its op failed to build
        peer_missing("cpu_adam_bench", "DeepSpeedCPUAdam", f"{type(exc).__name__}: {exc}",
                     "pip install deepspeed ninja (or bash scripts/setup.sh dev,bench)",
                     "--no-deepspeed")
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


def measure(
    fns: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved in a random order per repetition."""
    for fn in fns.values():  # warm-up: first touch of the state pages, DS's lazy state
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(reps):
        random.shuffle(order)
        for name in order:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return times


def paired(times: dict[str, list[float]], ref: str, name: str) -> str:
    """Median and quartiles over repetitions of t(ref) / t(name) within the same repetition:
    the speed ratio with the machine's slow drift (other jobs) cancelled pairwise."""
    q = statistics.quantiles([a / b for a, b in zip(times[ref], times[name], strict=True)], n=4)
    return f"{q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def placement_steps(
    p: torch.Tensor, param: torch.nn.Parameter, keep: list
) -> dict[str, Callable[[], object]]:
    """memopt on moments placed differently: 2 MiB-aligned THP pages, and the very tensors a
    torch fused AdamW allocated for the same parameter (memopt and torch then share the
    placement exactly)."""
    n = p.numel()
    opt = torch.optim.AdamW([param], fused=True, **HP)  # type: ignore[arg-type]
    opt.step()
    state = opt.state[param]
    g = param.grad
    assert g is not None
    return {
        "memopt (THP moments)": memopt_step(p, g, False, (thp_zeros(n, keep), thp_zeros(n, keep))),
        "memopt (torch's moments)": memopt_step(
            p, g, False, (state["exp_avg"], state["exp_avg_sq"])
        ),
    }


def run_size(
    n: int, reps: int, use_ds: bool, placement: bool = False, cpu_time: bool = False
) -> list[str]:
    p, g = torch.randn(n), torch.randn(n) * 1e-2
    param = torch.nn.Parameter(p)
    param.grad = g
    fns: dict[str, Callable[[], object]] = {
        "memopt": memopt_step(p, g, lowp=False),
        "memopt+bf16": memopt_step(p, g, lowp=True),
        "torch fused": torch_fused_step(param),
        "torch fused+bf16 copy_": torch_fused_step(param, lowp=True),
    }
    keep: list = []
    if placement:
        fns.update(placement_steps(p, param, keep))
    ds = deepspeed_step(param) if use_ds else None  # stops the run when DeepSpeed is missing
    if ds is not None:
        fns["DeepSpeedCPUAdam"] = ds
        fns["DeepSpeedCPUAdam+bf16 copy_"] = with_bf16_copy(ds, param)
    refs = yardsticks(n)
    clock = time.thread_time if cpu_time else time.perf_counter
    times = measure({**fns, **{k: f for k, (f, _) in refs.items()}}, reps, clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    bw = {k: nbytes / med[k] for k, (_, nbytes) in refs.items()}
    best = max(bw.values())
    rows = []
    for name in fns:
        nbytes = (30 if "bf16" in name else 28) * n
        rate = nbytes / med[name]
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        # each row against the peers producing the same output (fp32 only, or + bf16 copy)
        tail = "+bf16 copy_" if "bf16" in name else ""
        torch_ref, ds_ref = "torch fused" + tail, "DeepSpeedCPUAdam" + tail
        vs_torch = med[torch_ref] / med[name]
        vs_ds = paired(times, ds_ref, name) if ds is not None and name != ds_ref else ""
        rows.append(
            f"| {n / 1e6:.0f}M | {name} | {med[name] * 1e3:.1f} | {spread} | "
            f"{rate / 1e9:.1f} | {rate / best:.2f} | {vs_torch:.2f}x | "
            f"{paired(times, torch_ref, name) if name != torch_ref else ''} | {vs_ds} |"
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
    ap.add_argument(
        "--placement", action="store_true", help="also memopt on THP moments and on torch's"
    )
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="1 thread, timed by the thread's CPU time (the loop's own speed, without the time "
        "other jobs hold the core)",
    )
    args = ap.parse_args()
    if args.cpu_time:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_deepspeed:  # before any output: a missing peer stops the run here
        deepspeed_step(torch.nn.Parameter(torch.zeros(8)))
    print(
        f"# cpu_adam_bench: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, native={cpu_adam.native_available()} "
        f"isa={cpu_adam.selected_isa()} openmp={cpu_adam.has_openmp()}, "
        f"load average at start {os.getloadavg()[0]:.1f}, reps {args.reps}"
    )
    print("# rows with a bf16 copy are compared with the peers' bf16 rows (same output)")
    if args.no_deepspeed:
        print(skipped("DeepSpeedCPUAdam", "--no-deepspeed"))
    print(
        "| params | step | median ms | min-max ms | GB/s | of bw | speed vs torch "
        "| paired vs torch [IQR] | paired vs DeepSpeed [IQR] |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n = int(float(size))
        for row in run_size(n, args.reps, not args.no_deepspeed, args.placement, args.cpu_time):
            print(row, flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
