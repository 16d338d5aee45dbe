"""Step time of AdamW with int8 moments on the CPU: the eager torch path, the native kernel,
bitsandbytes' AdamW8bit (the peer with the same state bytes) and torch's fused fp32 AdamW,
on the parameters of one LLaMA-350M block.

    python benchmarks/int8_adam_cpu.py [--threads 2] [--steps 20] [--dtype float32]

Parameters: q, k, v, o (1024 x 1024), gate and up (2736 x 1024), down (1024 x 2736):
12.6M elements. Each variant gets its own copy of the parameters and fixed gradients, two
warm-up steps (the first allocates the state), then ``--steps`` timed steps; the table
gives the median. ``MEMOPT_KERNELS=torch`` forces the eager dequantize / fused AdamW /
quantize path, ``auto`` takes the native kernel (``memopt.offload.cpu_lowbit``) when the
library is built. bitsandbytes (the ``bench`` extra) runs its CPU path; without it the
script stops with an error rather than leave the peer out. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402
from _timing import median_step  # noqa: E402

SHAPES = [(1024, 1024)] * 4 + [(2736, 1024), (2736, 1024), (1024, 2736)]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES:
        p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(dtype))
        p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(dtype)
        params.append(p)
    return params


def _time(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], mode: str,
          dtype: torch.dtype, steps: int) -> float:  # fmt: skip
    os.environ["MEMOPT_KERNELS"] = mode
    params = _params(dtype)
    opt = make(params)
    ms = median_step(opt, steps) * 1e3
    del opt, params
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise SystemExit(
            "int8_adam_cpu: bitsandbytes (the peer) is not installed: "
            "bash scripts/setup.sh dev,bench"
        ) from err
    from memopt.offload.cpu_adam import native_available
    from memopt.optim import AdamW

    def int8(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return AdamW(ps, lr=1e-3, weight_decay=0.01, state_dtype="int8")

    def bnb8(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01)

    def fused(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)

    base = _time(fused, "auto", dtype, args.steps)
    eager = _time(int8, "torch", dtype, args.steps)
    native = _time(int8, "auto", dtype, args.steps) if native_available() else float("nan")
    peer = _time(bnb8, "auto", dtype, args.steps)
    n = sum(a * b for a, b in SHAPES)
    print(f"machine: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"params: one LLaMA-350M block, {n / 1e6:.1f}M {args.dtype}, median of {args.steps}")
    print()
    print("| optimizer | step (ms) | vs torch fused fp32 AdamW |")
    print("|---|---:|---:|")
    rows = [
        ("torch.optim.AdamW(fused=True), fp32 state", base),
        ('memopt AdamW(state_dtype="int8"), MEMOPT_KERNELS=torch (eager)', eager),
        ('memopt AdamW(state_dtype="int8"), auto (native kernel)', native),
        (f"bitsandbytes {bnb.__version__} AdamW8bit", peer),
    ]
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")
    print()
    print(f"native vs eager int8: {eager / native:.1f}x faster")
    print(f"memopt int8 (native) / bitsandbytes AdamW8bit: {native / peer:.3f}")


if __name__ == "__main__":
    main()
