"""Step time of the low-rank optimizers with int8 moments on the CPU: fp32 state, int8 state
on the torch code (``MEMOPT_KERNELS=torch``) and int8 state with the native quantization.

    python benchmarks/int8_state_cpu.py [--threads 2] [--steps 10] [--rank 256]

One LLaMA-350M block: q, k, v, o (1024 x 1024), gate and up (2736 x 1024), down
(1024 x 2736), fp32 parameters with fixed random gradients. GaLoreAdamW (proj="subspace",
scale=0.25) and ApolloAdamW (proj="random", scale=1.0) at ``--rank``, ``update_proj_gap``
large enough that no refresh falls in the timed steps. Each variant gets fresh parameters,
two warm-up steps (the first builds the projections and the state), then ``--steps``
timed steps; the table gives the median and the ratio to the fp32-state step.

Variants: ``fp32`` (state_dtype None, ``auto``); ``int8 torch`` (``MEMOPT_KERNELS=torch``:
every elementwise part on the torch code, quantization included); ``int8 native``
(``auto``: the native low-rank Adam and the native quantization); ``int8 auto, torch
quant`` (``auto`` with only the quantization held on the torch code), which separates what
the native quantization saves from what the native low-rank Adam saves. The peer:
galore-torch's ``GaLoreAdamW8bit`` (bitsandbytes' 8-bit Adam on the projected gradient, same
rank, scale and gap; ``proj_type="std"``), timed the same way, against memopt's int8 GaLore;
apollo-torch has no 8-bit optimizer, so APOLLO is compared with its own fp32 step only.
galore-torch 1.0's ``GaLoreAdamW8bit.step`` calls ``torch.cuda.synchronize()``, so on a
CPU-only torch it fails; the script runs it anyway and prints the error it raised.
Without galore-torch and bitsandbytes (the ``bench`` extra) the script stops with an error.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402
from _timing import median_step  # noqa: E402

from memopt.optim import ApolloAdamW, GaLoreAdamW
from memopt.optim.lowbit import native

SHAPES = [(1024, 1024)] * 4 + [(2736, 1024), (2736, 1024), (1024, 2736)]
OPTIMIZERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "GaLoreAdamW": (GaLoreAdamW, {"proj": "subspace", "scale": 0.25}),
    "ApolloAdamW": (ApolloAdamW, {"proj": "random", "scale": 1.0}),
}
# (label, state_dtype, MEMOPT_KERNELS, native quantization allowed)
VARIANTS = [
    ("fp32", None, "auto", True),
    ("int8 torch", "int8", "torch", True),
    ("int8 native", "int8", "auto", True),
    ("int8 auto, torch quant", "int8", "auto", False),
]


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES:
        p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=gen))
        p.grad = 1e-3 * torch.randn(shape, generator=gen)
        params.append(p)
    return params


def _time_peer(args: Any) -> float:
    """galore-torch's GaLoreAdamW8bit on the same parameters (median seconds per step)."""
    import galore_torch

    params = _params()
    group = {"params": params, "rank": args.rank, "update_proj_gap": 10**9, "scale": 0.25,
             "proj_type": "std"}  # fmt: skip
    return median_step(galore_torch.GaLoreAdamW8bit([group], lr=1e-3), args.steps)


def _time(name: str, state_dtype: str | None, mode: str, native_quant: bool, args: Any) -> float:
    """Median seconds per ``step()``."""
    os.environ["MEMOPT_KERNELS"] = mode
    real = native.native_on
    if not native_quant:
        native.native_on = lambda: False  # type: ignore[assignment]
    try:
        cls, extra = OPTIMIZERS[name]
        params = _params()
        group = {"params": params, "rank": args.rank, "update_proj_gap": 10**9, **extra}
        opt = cls([group], lr=1e-3, weight_decay=0.0, state_dtype=state_dtype)
        return median_step(opt, args.steps)
    finally:
        native.native_on = real  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import bitsandbytes  # noqa: F401
        import galore_torch  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            "int8_state_cpu: galore-torch and bitsandbytes (the peer) are not installed: "
            "bash scripts/setup.sh dev,bench"
        ) from err
    rows = []
    for name in OPTIMIZERS:
        ms = {label: 1e3 * _time(name, sd, mode, nq, args) for label, sd, mode, nq in VARIANTS}
        rows.append((name, ms))
    labels = [v[0] for v in VARIANTS]
    print(f"Machine: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"Command: python {' '.join(sys.argv)}")
    print()
    ratio_heads = ("int8 torch / fp32", "int8 native / fp32", "int8 torch / int8 native",
                   "torch quant / native quant")  # fmt: skip
    heads = [f"{lb} (ms)" for lb in labels] + list(ratio_heads)
    print("| optimizer | " + " | ".join(heads) + " |")
    print("|---" * (len(labels) + 5) + "|")
    for name, ms in rows:
        fp32 = ms["fp32"]
        cells = " | ".join(f"{ms[lb]:.1f}" for lb in labels)
        ratios = (
            ms["int8 torch"] / fp32,
            ms["int8 native"] / fp32,
            ms["int8 torch"] / ms["int8 native"],
            ms["int8 auto, torch quant"] / ms["int8 native"],
        )
        print(f"| {name} | {cells} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    os.environ["MEMOPT_KERNELS"] = "auto"
    print()
    try:
        peer = 1e3 * _time_peer(args)
    except (AssertionError, RuntimeError) as err:  # galore-torch 1.0 needs CUDA here
        print(f"galore-torch GaLoreAdamW8bit: could not run on this machine: "
              f"{type(err).__name__}: {err}")  # fmt: skip
        return
    mine = dict(rows)["GaLoreAdamW"]["int8 native"]
    print(f"galore-torch GaLoreAdamW8bit: {peer:.1f} ms; memopt GaLoreAdamW int8 (native) / "
          f"galore-torch GaLoreAdamW8bit: {mine / peer:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
