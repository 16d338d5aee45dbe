"""CPU projection GEMMs: torch's default fp32 GEMM vs memopt's matmul_dtype routes, one run.

For each projection shape of a LLaMA-60M block (R = G P^T, G m x n, P r x n), in one process,
interleaved: torch's default fp32 matmul (MKL on x86 wheels), the same fp32 matmul under
``memopt.optim.projection.lowp.cpu_bf16_fpmath`` (oneDNN, bf16 math allowed: the "fpmath" route
of ``matmul_dtype="bfloat16"``), and GEMMs on bf16 copies (the "cast" route, casts included).
Prints GFLOP/s, the ratio to the default, and the relative error against float64, plus a
cancellation case (G = 1 + 1e-3 noise, the product's mean removed) where bf16 inputs lose
the signal: it tells whether a route really rounds to bf16 on this CPU.

    python benchmarks/gemm_route.py [--reps 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from memopt.optim.projection import lowp

SHAPES = [(512, 512, 128), (1376, 512, 128), (1024, 1024, 256), (2736, 1024, 256)]


def timed(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def routes(g: torch.Tensor, p: torch.Tensor) -> dict[str, object]:
    def fpmath() -> torch.Tensor:
        with lowp.cpu_bf16_fpmath():
            return g @ p.T

    return {"default fp32": lambda: g @ p.T, "fpmath (oneDNN)": fpmath,
            "cast (bf16 copies)": lambda: (g.bfloat16() @ p.bfloat16().T).float()}


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).norm() / exact.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    if not lowp.fpmath_available():
        raise SystemExit("this torch has no oneDNN fp32-precision knob (torch >= 2.9 needed)")
    print(f"# {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"avx512_bf16/amx: {lowp.cpu_has_bf16_gemm()}")
    print("| m x n, rank | route | GFLOP/s | vs default | rel. error vs float64 | "
          "cancellation error |\n|---|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for m, n, r in SHAPES:
        g, p = torch.randn(m, n), torch.randn(r, n)
        exact = g.double() @ p.double().T
        g1 = 1 + 1e-3 * torch.randn(m, n)
        ones = torch.ones(m, n)
        exact1 = (g1.double() - 1) @ p.double().T
        base = None
        for name, fn in routes(g, p).items():
            sec = timed(fn, args.reps)
            base = base or sec
            err = rel_err(fn(), exact)  # type: ignore[operator]
            c = routes(g1, p)[name]() - routes(ones, p)[name]()  # type: ignore[operator]
            print(f"| {m}x{n}, {r} | {name} | {2 * m * n * r / sec / 1e9:.0f} | "
                  f"{base / sec:.2f}x | {err:.1e} | {rel_err(c, exact1):.1e} |")


if __name__ == "__main__":
    main()
