"""Convergence of memopt's optimizers against AdamW on a tiny byte-level LLaMA (CPU).

Every optimizer trains the same model (same init seed) on the same batches (same data
seed) of the Python standard library's sources for ``--steps`` steps, with the same
warmup + cosine schedule and gradient clipping; the final held-out loss (files never
trained on) is compared with AdamW's. Target: each memopt optimizer within 5% of AdamW.

For each optimizer every learning rate in its grid is run and the best final held-out
loss is kept (AdamW included, so the baseline is tuned too). ``--sweep`` widens the
grids. Output: a markdown table on stdout, a loss-curve PNG, and ``--out`` JSON.

    python benchmarks/convergence.py                       # 7 runs, ~20 min on 2 idle cores
    python benchmarks/convergence.py --sweep               # the LR sweep, 19 runs
    python benchmarks/convergence.py --quick               # tiny model, 60 steps (smoke test)
    python benchmarks/convergence.py --lr galore=3e-3,1e-2 --optimizers adamw galore
"""

from __future__ import annotations

import os

# Spin-waiting OpenMP threads collapse when the 2 cores are shared with anything else;
# passive waiting costs little when they are not. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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
TARGET = 0.05  # within 5% of AdamW's final held-out loss

# Learning-rate grids. Default: AdamW at its best rate in the sweep (5e-4) and at the usual
# 1e-3, each memopt optimizer at its best rate in the sweep (docs/benchmarks.md records it,
# 19 runs, ~67 min of training on a shared 2-core machine). --sweep reruns the whole sweep.
GRID: dict[str, list[float]] = {
    "adamw": [5e-4, 1e-3],
    "galore": [5e-3],
    "apollo": [3e-3],
    "apollo_mini": [3e-3],
    "frugal": [1e-3],
    "natural_galore": [5e-3],
}
SWEEP: dict[str, list[float]] = {
    "adamw": [2.5e-4, 5e-4, 1e-3, 3e-3],
    "galore": [5e-3, 1e-2, 2e-2],
    "apollo": [1e-3, 3e-3, 1e-2],
    "apollo_mini": [1e-3, 3e-3, 1e-2],
    "frugal": [5e-4, 1e-3, 2e-3],
    "natural_galore": [5e-3, 1e-2, 2e-2],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--steps", type=int, default=None, help="default 300 (60 with --quick)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="model init and data order seed")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--sweep", action="store_true", help="wider learning-rate grids")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR[,LR...]",
                   help="override one optimizer's learning-rate grid (repeatable)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, 60 steps, first learning rate of each grid")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--resume", type=Path, default=None, metavar="JSON",
                   help="reuse the runs of an earlier --out file with the same setup; train "
                        "only the (optimizer, lr) pairs it lacks")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "convergence.png")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the tables and draw the PNG from an earlier --out file; no training")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.eval_every, args.eval_windows = "tiny", 20, 32
    if args.steps is None:
        args.steps = 60 if args.quick else 300
    return args


def grids(args: argparse.Namespace) -> dict[str, list[float]]:
    base = SWEEP if args.sweep else GRID
    out = {name: list(base[name]) for name in args.optimizers}
    if args.quick:
        out = {name: lrs[:1] for name, lrs in out.items()}
    for spec in args.lr:
        name, _, values = spec.partition("=")
        if name not in OPTIMIZERS or not values:
            raise SystemExit(f"--lr wants NAME=LR[,LR...] with NAME in {OPTIMIZERS}, got {spec!r}")
        out[name] = [float(v) for v in values.split(",")]
    return out


def run_one(name: str, lr: float, data: tuple[torch.Tensor, torch.Tensor],
            args: argparse.Namespace) -> dict[str, Any]:
    train_data, heldout = data
    model = tiny_llama(args.size, seed=args.seed, max_seq_len=max(512, args.seq_len))
    opt = make_optimizer(name, model, lr=lr)
    res = train(
        model, opt, args.steps, train_data, heldout, batch_size=args.batch_size,
        seq_len=args.seq_len, seed=args.seed, eval_every=args.eval_every,
        eval_windows=args.eval_windows, progress=not args.no_progress,
        desc=f"{LABELS[name]} lr={lr:g}",
    )
    sb = memopt.optim.state_bytes(opt)
    cfg = default_config(name, int(model.config.hidden_size))
    cfg["lr"] = lr
    return dict(
        optimizer=name, label=LABELS[name], lr=lr, config=cfg,
        heldout_loss=res.heldout_loss, initial_heldout_loss=res.initial_heldout_loss,
        evals=res.evals, losses=res.losses, seconds=res.seconds,
        sec_per_step=res.seconds / max(1, args.steps), state_bytes=sb.total,
        cache_bytes=sb.cache, params=param_count(model),
    )


def best_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        b = best.get(r["optimizer"])
        if b is None or r["heldout_loss"] < b["heldout_loss"]:
            best[r["optimizer"]] = r
    return best


def results_table(best: dict[str, dict[str, Any]]) -> str:
    base = best.get("adamw")
    head = ("| optimizer | lr | held-out loss | ratio to AdamW | within 5% | state (MiB) | "
            "state vs AdamW | s/step |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name in OPTIMIZERS:
        r = best.get(name)
        if r is None:
            continue
        if base is not None:
            ratio = r["heldout_loss"] / base["heldout_loss"]
            ok = "baseline" if name == "adamw" else ("yes" if ratio <= 1 + TARGET else "**no**")
            ratio_s, mem_s = f"{ratio:.3f}", f"{r['state_bytes'] / base['state_bytes']:.2f}x"
        else:
            ratio_s = ok = mem_s = "n/a"
        cache = f" (+{r['cache_bytes'] / MIB:.2f} cache)" if r["cache_bytes"] else ""
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['heldout_loss']:.4f} | {ratio_s} | {ok} | "
            f"{r['state_bytes'] / MIB:.2f}{cache} | {mem_s} | {r['sec_per_step']:.2f} |"
        )
    return "\n".join(lines)


def sweep_table(runs: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> str:
    lines = ["| optimizer | lr | held-out loss |", "|---|---|---|"]
    for r in sorted(runs, key=lambda r: (OPTIMIZERS.index(r["optimizer"]), r["lr"])):
        mark = " (best)" if best[r["optimizer"]] is r else ""
        loss = f"{r['heldout_loss']:.4f}" if r["heldout_loss"] == r["heldout_loss"] else "diverged"
        lines.append(f"| {r['label']} | {r['lr']:g} | {loss}{mark} |")
    return "\n".join(lines)


def plot(best: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Training loss (EMA), held-out loss over steps, and final loss vs optimizer state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(OPTIMIZERS):
        r = best.get(name)
        if r is None:
            continue
        label = f"{r['label']} (lr {r['lr']:g})"
        color = "black" if name == "adamw" else colors[(i - 1) % len(colors)]
        lw = 2.0 if name == "adamw" else 1.3
        ema, smooth = None, []
        for v in r["losses"]:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax1.plot(range(1, len(smooth) + 1), smooth, label=label, color=color, lw=lw)
        steps, vals = zip(*r["evals"], strict=True)
        ax2.plot(steps, vals, marker="o", ms=3, label=label, color=color, lw=lw)
        ax3.scatter([r["state_bytes"] / MIB], [r["heldout_loss"]], color=color, s=40, zorder=3)
        ax3.annotate(r["label"], (r["state_bytes"] / MIB, r["heldout_loss"]), fontsize=8,
                     xytext=(5, 4), textcoords="offset points")
    finals = [r["heldout_loss"] for r in best.values()]
    lo = min(min(r["losses"]) for r in best.values())
    ax1.set(title="training loss (EMA 0.9; y axis clipped)", xlabel="step",
            ylabel="nats / byte", ylim=(lo - 0.1, max(finals) + 1.2))
    ax2.set(title="held-out loss (files never trained on)", xlabel="step", ylabel="nats / byte",
            ylim=(min(finals) - 0.1, max(finals) + 1.2))
    max_mib = max(r["state_bytes"] for r in best.values()) / MIB
    top = max(finals)
    if "adamw" in best:
        limit = best["adamw"]["heldout_loss"] * (1 + TARGET)
        top = max(top, limit)
        ax3.axhline(limit, color="gray", ls="--", lw=1)
        ax3.annotate("AdamW + 5%", (max_mib * 1.22, limit), fontsize=8, color="gray",
                     ha="right", xytext=(0, 3), textcoords="offset points")
    span = top - min(finals)
    ax3.set(title="final held-out loss vs optimizer state", xlabel="optimizer state (MiB)",
            ylabel="nats / byte", xlim=(0, max_mib * 1.25),
            ylim=(min(finals) - 0.1 * span, top + 0.15 * span))
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def git_commit() -> str:
    """The repository's HEAD commit, with "+dirty" if memopt/ has uncommitted changes."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "memopt")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


_SAME_SETUP = ("size", "steps", "batch_size", "seq_len", "seed", "train_bytes", "heldout_bytes")


def load_previous(path: Path, meta: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Runs and sessions of an earlier ``--out`` file with the same setup (for ``--resume``)."""
    old = json.loads(path.read_text())
    diff = [k for k in _SAME_SETUP if old["meta"].get(k) != meta[k]]
    if diff:
        raise SystemExit(f"--resume {path}: different setup ({', '.join(diff)}); not reusing it")
    return old["runs"], old["meta"].get("sessions", [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        old_sessions = saved["meta"].get("sessions", [])
        secs = sum(x.get("seconds", 0) for x in old_sessions)
        report(saved["runs"], saved["meta"], args,
               f"{len(saved['runs'])} runs, {secs / 60:.1f} min of training in "
               f"{len(old_sessions)} session(s) (from {args.report})")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = byte_corpus()
    lr_grid = grids(args)
    meta: dict[str, Any] = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), argv=sys.argv[1:],
        size=args.size, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        seed=args.seed, grids=lr_grid, torch=torch.__version__, threads=torch.get_num_threads(),
        python=platform.python_version(), train_bytes=int(data[0].numel()),
        heldout_bytes=int(data[1].numel()), commit=git_commit(),
    )
    previous: list[dict[str, Any]] = []
    sessions: list[Any] = []
    if args.resume is not None and args.resume.exists():
        previous, sessions = load_previous(args.resume, meta)
    runs: list[dict[str, Any]] = []
    n_trained = 0

    def save() -> None:
        if args.out:
            now = dict(date=meta["date"], commit=meta["commit"], trained=n_trained,
                       seconds=round(time.perf_counter() - t_start, 1))
            _write_json(args.out, {**meta, "sessions": [*sessions, now]}, runs)

    for name, lrs in lr_grid.items():
        for lr in lrs:
            done = [r for r in previous if r["optimizer"] == name and r["lr"] == lr]
            if done:
                runs.append(done[0])
                continue
            try:
                r = run_one(name, lr, data, args)
                r["commit"] = meta["commit"]
                runs.append(r)
            except FloatingPointError as e:  # a diverged run is a result, not a crash
                print(f"{LABELS[name]} lr={lr:g}: {e}", file=sys.stderr)
                runs.append(dict(optimizer=name, label=LABELS[name], lr=lr,
                                 heldout_loss=float("nan"), diverged=str(e)))
            n_trained += 1
            save()  # partial results survive an interrupted run
    total = time.perf_counter() - t_start
    reused = f", {len(runs) - n_trained} runs reused from {args.resume}" if previous else ""
    report(runs, meta, args, f"{n_trained} runs trained in {total / 60:.1f} min{reused}")
    if args.out:
        save()
        print(f"wrote {args.out}")
    return 0


def report(runs: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace,
           note: str) -> None:
    """Print the results and sweep tables; draw the PNG."""
    finite = [r for r in runs if r["heldout_loss"] == r["heldout_loss"]]
    best = best_runs(finite)
    everything = dict(best)
    for r in runs:
        everything.setdefault(r["optimizer"], r)
    model_params = next((r["params"] for r in finite), 0)
    print(f"\n{meta['size']} LLaMA ({model_params / 1e6:.2f}M params), {meta['steps']} steps, "
          f"batch {meta['batch_size']} x {meta['seq_len']} bytes, {meta['threads']} threads; "
          f"{note}\n")
    print(results_table(best))
    print("\nLearning-rate sweep (final held-out loss):\n")
    print(sweep_table(runs, everything))
    if not args.no_png and finite:
        title = (f"{meta['size']} byte-level LLaMA ({model_params / 1e6:.1f}M params), "
                 f"{meta['steps']} steps, batch {meta['batch_size']}x{meta['seq_len']} bytes; "
                 "best lr per optimizer")
        plot(best, args.png, title)
        print(f"\nwrote {args.png}")


def _write_json(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, runs=runs), indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
