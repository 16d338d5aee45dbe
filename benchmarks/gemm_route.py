"""CPU projection GEMMs: torch's default fp32 GEMM vs memopt's matmul_dtype routes, one run.

Table 1, for each projection shape of a LLaMA-60M / 350M block (R = G P^T, G m x n, P r x n),
in one process: torch's default fp32 matmul (MKL on x86 wheels), the same fp32 matmul under
``memopt.optim.projection.lowp.cpu_bf16_fpmath`` (oneDNN, bf16 math allowed: the "fpmath" route
of ``matmul_dtype="bfloat16"``), GEMMs on bf16 copies (the "cast" route, casts included) and,
on AMX CPUs, memopt's own AMX kernel (``memopt.offload.cpu_gemm``, the "native" route). Prints
GFLOP/s, the ratio to the default, and the relative error against float64, plus a
cancellation case (G = 1 + 1e-3 noise, the product's mean removed) where bf16 inputs lose
the signal: it tells whether a route really rounds to bf16 on this CPU.

Table 2, what a GaLore step spends in GEMMs: every projection (P^T G or G P^T) and fused
write-back (W += alpha P L) of one transformer block at rank 128 (60M) / 256 (350M), with
gradients drawn from a pool of 4 sets so they are not all cache-hot, the routes interleaved
round by round; ms per block and the ratio to oneDNN's fpmath route (torch's own bf16 path).

    python benchmarks/gemm_route.py [--reps 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from memopt.offload import cpu_gemm
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

    out = {"default fp32": lambda: g @ p.T, "fpmath (oneDNN)": fpmath,
           "cast (bf16 copies)": lambda: (g.bfloat16() @ p.bfloat16().T).float()}
    if cpu_gemm.available():
        out["native (memopt AMX)"] = lambda: cpu_gemm.mm(g, p.T)
    return out


BLOCKS = {"60m": ([(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)], 128),
          "350m": ([(1024, 1024)] * 4 + [(2736, 1024)] * 2 + [(1024, 2736)], 256)}
POOL = 4


def block_routes() -> dict[str, object]:
    """name -> (project(g, p, right), write_back(w, p, low, right)) for GaLore's two GEMMs."""
    def proj(g, p, right):
        return g @ p.T if right else p.T @ g

    def back(w, p, low, right):
        w.addmm_(low, p, alpha=-1e-6) if right else w.addmm_(p, low, alpha=-1e-6)

    def proj_fp(g, p, right):
        with lowp.cpu_bf16_fpmath():
            return proj(g, p, right)

    def back_fp(w, p, low, right):
        with lowp.cpu_bf16_fpmath():
            back(w, p, low, right)

    out = {"default fp32": (proj, back), "fpmath (oneDNN)": (proj_fp, back_fp)}
    if cpu_gemm.available():
        def proj_nat(g, p, right):
            return cpu_gemm.mm(g, p.T) if right else cpu_gemm.mm(p.T, g)

        def back_nat(w, p, low, right):
            a, b = (low, p) if right else (p, low)
            cpu_gemm.addmm_(w, a, b, alpha=-1e-6)

        out["native (memopt AMX)"] = (proj_nat, back_nat)
    return out


def block_table(reps: int, rounds: int) -> None:
    print("\n| block | route | projections ms | write-backs ms | total ms | vs fpmath |\n"
          "|---|---|---:|---:|---:|---:|")
    routes_ = block_routes()
    for size, (shapes, r) in BLOCKS.items():
        gen = torch.Generator().manual_seed(0)
        mats = []
        for m, n in shapes:
            right = m >= n
            basis = torch.linalg.qr(torch.randn(n if right else m, r, generator=gen))[0]
            p = basis.T.contiguous() if right else basis.contiguous()
            grads = [torch.randn(m, n, generator=gen) for _ in range(POOL)]
            mats.append((grads, torch.randn(m, n, generator=gen), p, right))
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in routes_}
        for _ in range(rounds):
            for name, (proj, back) in routes_.items():  # type: ignore[misc]
                tp = tb = 0.0
                for it in range(reps + 3):
                    t0 = time.perf_counter()
                    lows = [proj(gs[it % POOL], p, right) for gs, _, p, right in mats]
                    t1 = time.perf_counter()
                    for (_, w, p, right), low in zip(mats, lows, strict=True):
                        back(w, p, low, right)
                    t2 = time.perf_counter()
                    if it >= 3:
                        tp, tb = tp + t1 - t0, tb + t2 - t1
                times[name].append((tp / reps * 1e3, tb / reps * 1e3))
        ref = statistics.median(a + b for a, b in times["fpmath (oneDNN)"])
        for name, ts in times.items():
            p_ms = statistics.median(a for a, _ in ts)
            b_ms = statistics.median(b for _, b in ts)
            tot = statistics.median(a + b for a, b in ts)
            print(f"| {size} (rank {r}) | {name} | {p_ms:.3f} | {b_ms:.3f} | {tot:.3f} | "
                  f"{tot / ref:.2f}x |")


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).norm() / exact.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of table 2")
    args = ap.parse_args()
    if not lowp.fpmath_available():
        raise SystemExit("this torch has no oneDNN fp32-precision knob (torch >= 2.9 needed)")
    print(f"# {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"avx512_bf16/amx: {lowp.cpu_has_bf16_gemm()}; memopt AMX kernel: "
          f"{cpu_gemm.available()}")
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
    block_table(args.reps, args.rounds)


if __name__ == "__main__":
    main()
