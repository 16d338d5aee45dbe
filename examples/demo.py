"""memopt demo: train a small LLaMA on CPU with a memory-efficient optimizer, then with AdamW.

A ~5.3M-parameter byte-level LLaMA (``transformers.LlamaForCausalLM``, random init) learns
to predict the Python standard library's own source code; nothing is downloaded. The
same model, data order and schedule are trained twice, once with a memopt optimizer
(GaLore by default) and once with ``torch.optim.AdamW``, and the demo ends with a table
of held-out loss (nats per byte, on files never trained on) and optimizer-state memory.

    python examples/demo.py                          # GaLore vs AdamW, ~2-4 min on 2 cores
    python examples/demo.py --optimizer apollo_mini  # or apollo, frugal, natural_galore
    python examples/demo.py --steps 300              # longer, closer to converged

Works from any directory (``bash scripts/demo.sh`` sets up .venv first, then runs this).
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads collapse when the cores are shared.
# It has to be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import memopt  # noqa: E402
from examples.tinyllama import (  # noqa: E402
    LABELS,
    OPTIMIZERS,
    byte_corpus,
    default_config,
    make_optimizer,
    param_count,
    tiny_llama,
    train,
)

MIB = 1024 * 1024
# Every optimizer runs at its best learning rate from the sweep in docs/benchmarks.md
# (AdamW 5e-4 of 2.5e-4 / 5e-4 / 1e-3 / 3e-3), so the comparison is against a tuned baseline.
ADAMW_LR = 5e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=[o for o in OPTIMIZERS if o != "adamw"],
                   default="galore", help="the memopt optimizer to demo (default: galore)")
    p.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    p.add_argument("--lr", type=float, default=None, help="memopt optimizer's learning rate")
    p.add_argument("--adamw-lr", type=float, default=ADAMW_LR)
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-adamw", action="store_true", help="skip the AdamW comparison run")
    return p.parse_args(argv)


def run(name: str, lr: float | None, data: tuple[torch.Tensor, torch.Tensor],
        args: argparse.Namespace) -> dict[str, float]:
    model = tiny_llama(args.size, seed=args.seed)
    opt = make_optimizer(name, model, lr=lr)
    used_lr = opt.param_groups[0]["lr"]
    res = train(model, opt, args.steps, data[0], data[1], batch_size=args.batch_size,
                seq_len=args.seq_len, seed=args.seed, progress=True,
                desc=f"{LABELS[name]:<14} lr={used_lr:g}")
    sb = memopt.optim.state_bytes(opt)
    return dict(lr=used_lr, initial=res.initial_heldout_loss, final=res.heldout_loss,
                state=sb.total, cache=sb.cache, seconds=res.seconds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = byte_corpus()
    probe = tiny_llama(args.size, seed=args.seed)
    hidden = int(probe.config.hidden_size)
    print(f"memopt {memopt.__version__} demo | torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"model: {args.size} byte-level LLaMA, {param_count(probe) / 1e6:.2f}M params "
          f"(hidden {hidden}, {probe.config.num_hidden_layers} layers)")
    print(f"data: Python stdlib sources, {data[0].numel() / 1e6:.1f} MB train / "
          f"{data[1].numel() / 1e6:.2f} MB held-out (different files)")
    cfg = {k: v for k, v in default_config(args.optimizer, hidden).items() if k != "lr"}
    print(f"{LABELS[args.optimizer]} settings: {cfg}")
    print(f"{args.steps} steps per run, batch {args.batch_size} x {args.seq_len} bytes\n")
    del probe

    results = {args.optimizer: run(args.optimizer, args.lr, data, args)}
    if not args.no_adamw:
        results["adamw"] = run("adamw", args.adamw_lr, data, args)

    base = results.get("adamw")
    start = results[args.optimizer]["initial"]
    print(f"\nheld-out loss: nats/byte on files never trained on (at init {start:.3f}, about "
          "ln 256 = 5.545); optimizer state: persistent bytes (memopt.optim.state_bytes)\n")
    print(f"{'optimizer':<16}{'lr':>8}{'held-out loss':>15}{'vs AdamW':>10}"
          f"{'state (MiB)':>13}{'vs AdamW':>10}{'time (s)':>10}")
    for name, r in results.items():
        loss_rel = f"{r['final'] / base['final']:.3f}" if base else "-"
        mem_rel = f"{r['state'] / base['state']:.2f}x" if base else "-"
        print(f"{LABELS[name]:<16}{r['lr']:>8g}{r['final']:>15.3f}{loss_rel:>10}"
              f"{r['state'] / MIB:>13.2f}{mem_rel:>10}{r['seconds']:>10.0f}")
    if results[args.optimizer]["cache"]:
        print(f"({LABELS[args.optimizer]} also regenerates "
              f"{results[args.optimizer]['cache'] / MIB:.2f} MiB of projection matrices from "
              "seeds; they are not saved in checkpoints)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
