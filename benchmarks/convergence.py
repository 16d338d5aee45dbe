"""Convergence of memopt's optimizers against AdamW on a tiny byte-level LLaMA (CPU or GPU).

Every optimizer trains the same model (same init seed) on the same batches (same data
seed) of the Python standard library's sources for ``--steps`` steps, with the same
warmup + cosine schedule and gradient clipping; the final held-out loss (files never
trained on) is compared with AdamW's. Target: each memopt optimizer within 5% of AdamW.

Learning rates: every rate in an optimizer's grid is run and the one with the lowest
final *validation* loss is kept (AdamW included, so the baseline is tuned too). The
validation split is other held-out files (benchmarks/_convergence_variants.py), so the
reported held-out loss plays no part in the choice. ``--sweep`` widens the grids.
``OPTION_SETS`` adds option values to choose among the same way (none by default);
``--set`` adds them from the command line (``--set apollo_mini:scale=128,64``).

8-bit state: memopt AdamW, GaLore, APOLLO, FRUGAL and Natural GaLore with
``state_dtype="int8"``, and bitsandbytes' ``AdamW8bit`` as the peer, each at the rate
chosen for its 32-bit counterpart. Targets: no more than 2% above the 32-bit
counterpart's held-out loss; memopt's AdamW int8 within 1% of bitsandbytes'.
``--optimizers`` picks a subset. Output: markdown tables on stdout, a loss-curve PNG,
and ``--out`` JSON. The PNG goes to ``--png PATH``; without ``--png`` only the full default
run (every optimizer, default model, steps, seed and grids, on the CPU: the run the docs
figure shows) draws it, into docs/img/convergence.png. ``--quick`` and partial runs draw none
unless ``--png`` is given, so a smoke test does not replace the committed figure.

    python benchmarks/convergence.py                       # 13 runs, ~80 min on 2 busy cores
    python benchmarks/convergence.py --device cuda         # the same on a GPU
    python benchmarks/convergence.py --sweep               # the LR sweep, 19 + 6 runs
    python benchmarks/convergence.py --quick               # tiny model, 60 steps (smoke test)
    python benchmarks/convergence.py --lr galore=3e-3,1e-2 --optimizers adamw galore
    python benchmarks/convergence.py --optimizers apollo_mini --set apollo_mini:scale=128,64
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
from benchmarks._convergence_variants import (  # noqa: E402
    ALL_NAMES,
    BF16_MM,
    COUNTERPART,
    EIGHT_BIT,
    bf16_matmul_table,
    build_optimizer,
    config_of,
    eight_bit_table,
    label_of,
    parse_overrides,
    plot,
    validation_split,
)
from examples.tinyllama import (  # noqa: E402
    OPTIMIZERS,
    byte_corpus,
    evaluate,
    param_count,
    tiny_llama,
    train,
)

MIB = 1024 * 1024
TARGET = 0.05  # within 5% of AdamW's final held-out loss

# Learning-rate grids (32-bit optimizers; 8-bit variants take their counterpart's choice).
# Default: AdamW at its best rate in the sweep (5e-4) and at the usual 1e-3, each memopt
# optimizer at its best rate in the sweep (docs/benchmarks.md records it, 19 runs, ~67 min
# of training on a shared 2-core machine). --sweep reruns the whole sweep.
GRID: dict[str, list[float]] = {
    "adamw": [5e-4, 1e-3],
    "galore": [5e-3],
    "apollo": [3e-3],
    "apollo_mini": [3e-3],
    "frugal": [1e-3],
    "natural_galore": [5e-3],
}
# Option values tried besides the rates (each with every rate; validation picks). Empty:
# every optimizer runs its one configuration of examples.tinyllama.default_config. Until
# session 9 APOLLO-Mini also ran scale 128 next to the reference's width rule (hidden/4,
# now its configuration); docs/benchmarks.md, "APOLLO-Mini: the reference's width rule".
OPTION_SETS: dict[str, list[dict[str, Any]]] = {}
SWEEP: dict[str, list[float]] = {
    "adamw": [2.5e-4, 5e-4, 1e-3, 3e-3],
    "galore": [5e-3, 1e-2, 2e-2],
    "apollo": [1e-3, 3e-3, 1e-2],
    "apollo_mini": [1e-3, 3e-3, 1e-2],
    "frugal": [5e-4, 1e-3, 2e-3],
    "natural_galore": [5e-3, 1e-2, 2e-2],
}


DOCS_PNG = ROOT / "docs" / "img" / "convergence.png"
# What the committed figure's run leaves at its default (anything else makes a different plot).
_DOCS_RUN_KEYS = ("size", "batch_size", "seq_len", "seed", "optimizers", "sweep", "lr",
                  "overrides", "eval_every", "eval_windows", "quick", "device")


def _is_docs_run(p: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """True for the full default run, the one docs/img/convergence.png shows."""
    return args.steps == 300 and all(getattr(args, k) == p.get_default(k)
                                     for k in _DOCS_RUN_KEYS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--steps", type=int, default=None, help="default 300 (60 with --quick)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="model init and data order seed")
    p.add_argument("--optimizers", nargs="+", choices=ALL_NAMES, default=list(ALL_NAMES),
                   help="32-bit optimizers and 8-bit variants (default: all)")
    p.add_argument("--sweep", action="store_true", help="wider learning-rate grids")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR[,LR...]",
                   help="override one optimizer's learning-rate grid (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="NAME:KEY=V[,V...]",
                   dest="overrides", help="also run these values of an optimizer option "
                   "(each with every rate of its grid; validation picks; repeatable)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, 60 steps, first learning rate of each grid")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu",
                   help="where the model, data and optimizer state live (cpu, cuda, cuda:1)")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--resume", type=Path, default=None, metavar="JSON",
                   help="reuse the runs of an earlier --out file with the same setup; train "
                        "only the (optimizer, lr) pairs it lacks")
    p.add_argument("--png", type=Path, default=None,
                   help=f"draw the loss curves here (default: {DOCS_PNG.relative_to(ROOT)} for "
                        "the full default run, no PNG for any other run)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the tables from an earlier --out file (and the PNG, with --png); "
                        "no training")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.eval_every, args.eval_windows = "tiny", 20, 32
    if args.steps is None:
        args.steps = 60 if args.quick else 300
    if args.png is None and args.report is None and _is_docs_run(p, args):
        args.png = DOCS_PNG
    return args


def grids(args: argparse.Namespace) -> dict[str, list[float]]:
    """Learning-rate grids of the 32-bit optimizers, and of 8-bit variants given ``--lr``
    (an 8-bit variant otherwise takes its counterpart's chosen rate)."""
    base = SWEEP if args.sweep else GRID
    out = {name: list(base[name]) for name in args.optimizers if name in OPTIMIZERS}
    if args.quick:
        out = {name: lrs[:1] for name, lrs in out.items()}
    for spec in args.lr:
        name, _, values = spec.partition("=")
        if name not in ALL_NAMES or not values:
            raise SystemExit(f"--lr wants NAME=LR[,LR...] with NAME in {ALL_NAMES}, got {spec!r}")
        out[name] = [float(v) for v in values.split(",")]
    return out


def run_one(name: str, lr: float, data: tuple[torch.Tensor, ...],
            args: argparse.Namespace, kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one (optimizer, options ``kw``, lr); final held-out (test) and validation losses."""
    train_data, heldout, val = data
    kw = kw or {}
    model = tiny_llama(args.size, seed=args.seed, max_seq_len=max(512, args.seq_len))
    model.to(args.device)
    opt = build_optimizer(name, model, lr, **kw)
    res = train(
        model, opt, args.steps, train_data, heldout, batch_size=args.batch_size,
        seq_len=args.seq_len, seed=args.seed, eval_every=args.eval_every,
        eval_windows=args.eval_windows, progress=not args.no_progress,
        desc=f"{label_of(name, kw)} lr={lr:g}",
    )
    val_loss = evaluate(model, val, seq_len=args.seq_len, n_windows=args.eval_windows)
    sb = memopt.optim.state_bytes(opt)
    return dict(
        optimizer=name, label=label_of(name, kw), lr=lr, overrides=kw,
        config=config_of(name, int(model.config.hidden_size), lr, kw), val_loss=val_loss,
        heldout_loss=res.heldout_loss, initial_heldout_loss=res.initial_heldout_loss,
        evals=res.evals, losses=res.losses, seconds=res.seconds,
        sec_per_step=res.seconds / max(1, args.steps), state_bytes=sb.total,
        cache_bytes=sb.cache, params=param_count(model),
    )


def selection_loss(r: dict[str, Any]) -> float:
    """What picks the learning rate: the validation loss (held-out in pre-validation files)."""
    return float(r.get("val_loss", r["heldout_loss"]))


def best_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer, the run with the lowest validation loss (not the reported loss)."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        b = best.get(r["optimizer"])
        if b is None or selection_loss(r) < selection_loss(b):
            best[r["optimizer"]] = r
    return best


def results_table(best: dict[str, dict[str, Any]]) -> str:
    base = best.get("adamw")
    head = ("| optimizer | lr | val loss | held-out loss | ratio to AdamW | within 5% | "
            "state (MiB) | state vs AdamW | s/step |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
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
        val = f"{r['val_loss']:.4f}" if "val_loss" in r else "n/a"
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {val} | {r['heldout_loss']:.4f} | {ratio_s} | {ok} | "
            f"{r['state_bytes'] / MIB:.2f}{cache} | {mem_s} | {r['sec_per_step']:.2f} |"
        )
    return "\n".join(lines)


def sweep_table(runs: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> str:
    lines = ["| optimizer | lr | val loss | held-out loss |", "|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (ALL_NAMES.index(r["optimizer"]), r["lr"])):
        mark = " (chosen)" if best[r["optimizer"]] is r else ""
        if r["heldout_loss"] != r["heldout_loss"]:
            lines.append(f"| {r['label']} | {r['lr']:g} | diverged | diverged |")
            continue
        val = f"{r['val_loss']:.4f}" if "val_loss" in r else "n/a"
        lines.append(f"| {r['label']} | {r['lr']:g} | {val}{mark} | {r['heldout_loss']:.4f} |")
    return "\n".join(lines)


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


_SAME_SETUP = ("size", "steps", "batch_size", "seq_len", "seed", "train_bytes", "heldout_bytes",
               "val_bytes", "device")


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
    data = tuple(t.to(args.device) for t in (*byte_corpus(), validation_split()))
    lr_grid = grids(args)
    overrides = {name: sets[:1] if args.quick else sets for name, sets in OPTION_SETS.items()}
    overrides.update(parse_overrides(args.overrides))
    meta: dict[str, Any] = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), argv=sys.argv[1:],
        size=args.size, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        seed=args.seed, grids=lr_grid, torch=torch.__version__, threads=torch.get_num_threads(),
        python=platform.python_version(), train_bytes=int(data[0].numel()),
        heldout_bytes=int(data[1].numel()), val_bytes=int(data[2].numel()),
        device=str(args.device), commit=git_commit(), overrides=overrides,
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

    def run_grid(name: str, lrs: list[float], option_sets: list[dict[str, Any]]) -> None:
        nonlocal n_trained
        for kw, lr in ((kw, lr) for kw in option_sets for lr in lrs):
            done = [r for r in previous if r["optimizer"] == name and r["lr"] == lr
                    and r.get("overrides", {}) == kw]
            if done:
                runs.append(done[0])
                continue
            try:
                r = run_one(name, lr, data, args, kw)
                r["commit"] = meta["commit"]
                runs.append(r)
            except FloatingPointError as e:  # a diverged run is a result, not a crash
                print(f"{label_of(name, kw)} lr={lr:g}: {e}", file=sys.stderr)
                runs.append(dict(optimizer=name, label=label_of(name, kw), lr=lr, overrides=kw,
                                 heldout_loss=float("nan"), diverged=str(e)))
            n_trained += 1
            save()  # partial results survive an interrupted run

    for name, lrs in lr_grid.items():
        if name in OPTIMIZERS:
            run_grid(name, lrs, overrides.get(name, [{}]))
    # 8-bit and bf16-matmul variants: at the rate chosen (on validation) for their counterpart
    chosen = best_runs([r for r in runs if r["heldout_loss"] == r["heldout_loss"]])
    for name in (n for n in ALL_NAMES if n in COUNTERPART and n in args.optimizers):
        base = COUNTERPART[name]
        default = chosen[base]["lr"] if base in chosen else GRID[base][0]
        meta["grids"][name] = lr_grid.get(name, [default])
        same = [chosen[base].get("overrides", {})] if base in chosen else [{}]
        run_grid(name, meta["grids"][name], overrides.get(name, same))
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
    if any(name in best for name in EIGHT_BIT):
        print("\n8-bit optimizer state (each at its 32-bit counterpart's learning rate):\n")
        print(eight_bit_table(best))
    if any(name in best for name in BF16_MM):
        print("\nbf16 projection GEMMs (each at its fp32 counterpart's learning rate):\n")
        print(bf16_matmul_table(best))
    print("\nLearning-rate sweep (final losses; the rate is chosen on validation):\n")
    print(sweep_table(runs, everything))
    if args.png is None and not args.no_png:
        print(f"\nno PNG drawn: not the full default run that {DOCS_PNG.relative_to(ROOT)} "
              "shows (--png PATH draws one)")
    elif not args.no_png and finite:
        title = (f"{meta['size']} byte-level LLaMA ({model_params / 1e6:.1f}M params), "
                 f"{meta['steps']} steps, batch {meta['batch_size']}x{meta['seq_len']} bytes; "
                 "best lr per optimizer")
        plot(best, args.png, title, TARGET)
        print(f"\nwrote {args.png}")


def _write_json(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, runs=runs), indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
