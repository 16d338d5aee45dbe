"""Achieved memory bandwidth of memopt's fused update kernels, next to torch's.

For each kernel and shape, the bytes a kernel must move (each tensor read or written once)
divided by its median time, and that as a fraction of two ceilings measured or known for
the device: a device-to-device copy in the same run (what a pure streaming kernel gets
here) and the spec sheet's peak, where the GPU is one we know. Side by side:

- ``adam_update`` (memopt's one-pass Adam of a projected gradient, Triton on a GPU):
  reads R, m, v; writes m, v, N. Against the same math in eager torch (memopt's torch
  path, several passes) and torch's own fused AdamW kernel on a tensor of the same size
  (reads p, g, m, v; writes p, m, v), the peer for a single-pass Adam.
- ``adam_update`` with APOLLO's per-channel norms (row channels and column channels).
- ``scaled_update_`` (APOLLO's write-back, W <- keep W + alpha G f): reads W, G; writes W.
  Against eager torch (``mul_`` then ``addcmul_``).
- ``channel_norms`` (APOLLO's per-row or per-column norms of G): reads G. The native CPU
  pass against torch's ``linalg.vector_norm``.

On a CPU with the native library built, "memopt native CPU" rows (``MEMOPT_KERNELS=auto``:
``csrc/cpu_adam``'s one-pass Adam and channel sums) sit next to the torch path's.

    python benchmarks/kernel_bw.py --device cuda [--reps 30]

On a CPU it times the native and torch paths (Triton runs there only interpreted, which
says nothing about speed).

    python benchmarks/kernel_bw.py --device cpu --shapes 512x128,1376x128,128x1376,512x1376
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

# Spec-sheet HBM bandwidth, bytes/s (NVIDIA datasheets: H100 SXM5 80 GB 3.35 TB/s,
# H200 141 GB 4.8 TB/s, A100 80 GB SXM 2.04 TB/s).
PEAK = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.04e12}
F32 = 4


def timer(dev: torch.device, fn: Callable[[], object], reps: int, warm: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ["MEMOPT_KERNELS"] = name
        try:
            return fn()
        finally:
            os.environ.pop("MEMOPT_KERNELS", None)

    return run


def cases(
    dev: torch.device, shape: tuple[int, int], triton: bool
) -> list[tuple[str, int, Callable]]:
    """(name, bytes moved, callable) for one shape."""
    from memopt.offload.cpu_adam import native_available as native_cpu_available
    from memopt.optim import kernels

    n = shape[0] * shape[1]
    low = torch.randn(shape, device=dev)
    m, v = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    w, g = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    col = torch.rand(shape[0], 1, device=dev)
    p, grad = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    pm, pv = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    step = torch.tensor(1.0, device=dev)
    adam_kw = dict(step=5, beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-3, eps_mode="galore")

    def adam(norms: int | None) -> Callable[[], object]:
        return lambda: kernels.adam_update(low, m, v, norms_dim=norms, **adam_kw)

    def torch_fused() -> None:
        torch._fused_adamw_([p], [grad], [pm], [pv], [], [step], lr=1e-3, beta1=0.9,
                            beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                            maximize=False)

    def scaled() -> None:
        kernels.scaled_update_(w, g, col, alpha=-1e-3, keep=0.999)

    def norms(dim: int) -> Callable[[], object]:
        return lambda: kernels.channel_norms(g, dim)

    out: list[tuple[str, int, Callable]] = []
    native = dev.type == "cpu" and native_cpu_available()
    backends = (["triton"] if triton else []) + (["auto"] if native else []) + ["torch"]
    for be in backends:
        tag = {"triton": "memopt Triton", "auto": "memopt native CPU"}.get(be, "memopt torch path")
        out.append((f"adam_update ({tag})", 6 * n * F32, with_backend(be, adam(None))))
        out.append((f"adam_update + row norms ({tag})", 6 * n * F32, with_backend(be, adam(1))))
        out.append((f"adam_update + column norms ({tag})", 6 * n * F32,
                    with_backend(be, adam(0))))
        out.append((f"scaled_update_ ({tag})", 3 * n * F32, with_backend(be, scaled)))
        if be != "triton":  # APOLLO's channel norms of G (native on the CPU, else torch's)
            out.append((f"channel_norms, rows ({tag})", n * F32, with_backend(be, norms(1))))
            out.append((f"channel_norms, columns ({tag})", n * F32, with_backend(be, norms(0))))
    if dev.type == "cuda" or hasattr(torch, "_fused_adamw_"):
        out.append(("torch._fused_adamw_ (peer, one tensor)", 7 * n * F32, torch_fused))
    return out


def copy_bandwidth(dev: torch.device, reps: int) -> float:
    a = torch.empty(256 * 2**20 // F32, device=dev)
    b = torch.empty_like(a)
    sec = timer(dev, lambda: b.copy_(a), reps)
    return 2 * a.numel() * F32 / sec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="5461x512,2048x512,8192x4096",
                    help="comma list of RxC (projected gradients of LLaMA-1B, a big matrix)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    triton = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if triton else "CPU"
    peak = next((v for k, v in PEAK.items() if k in name), None)
    copy_bw = copy_bandwidth(dev, args.reps)
    print(f"device: {name}, torch {torch.__version__}; device-to-device copy "
          f"{copy_bw / 1e9:.0f} GB/s" + (f"; spec peak {peak / 1e9:.0f} GB/s" if peak else ""))
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| kernel | shape | bytes moved MiB | time us | GB/s | / copy | / spec peak |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for spec in args.shapes.split(","):
        shape = tuple(int(x) for x in spec.split("x"))
        assert len(shape) == 2, f"shape {spec!r}: want RxC"
        for label, nbytes, fn in cases(dev, shape, triton):
            sec = timer(dev, fn, args.reps)
            bw = nbytes / sec
            frac = f"{bw / peak:.2f}" if peak else "-"
            print(f"| {label} | {spec} | {nbytes / 2**20:.1f} | {sec * 1e6:.1f} "
                  f"| {bw / 1e9:.0f} | {bw / copy_bw:.2f} | {frac} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
