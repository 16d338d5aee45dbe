"""The ``memopt`` command line: ``memopt estimate``, ``memopt report`` and ``memopt run``.

``estimate`` prints the predicted peak per tier of a built-in tiny LLaMA (random init,
described on the meta device) with the given optimizer, stage and world size, or of a recipe
(``--recipe RECIPE.yaml [key=value ...]``: ``memopt.config.estimate``); ``report``
trains that model for a few steps in this process under a ``memopt.memory.Timeline`` and
writes ``timeline.png`` and ``timeline.md`` with the estimate beside the measured curve;
``run`` launches a recipe (``recipes/*.yaml``) under torchrun (``memopt.cli.launch``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from memopt.cli import _workload
from memopt.cli._workload import DTYPES, OPTIMIZERS, Workload


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _workload_args(p: argparse.ArgumentParser, *, budget: bool) -> None:
    n = _positive_int
    # (no argparse defaults where a recipe has its own key: --recipe refuses what was given;
    # Workload supplies the defaults)
    p.add_argument("--model", choices=("llama",), help="built-in model family (default llama)")
    p.add_argument("--hidden", type=n, help="hidden size (default 256)")
    p.add_argument("--layers", type=n, help="decoder layers (default 4)")
    p.add_argument("--heads", type=n, help="attention heads (default 4)")
    p.add_argument("--intermediate", type=n, help="MLP size (default ~8/3 hidden)")
    p.add_argument("--vocab", type=n, help="vocabulary (default 8000)")
    p.add_argument("--batch-size", dest="batch_size", type=n, help="default 4")
    p.add_argument("--seq-len", dest="seq_len", type=n, help="default 128")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adamw")
    p.add_argument("--rank", type=n, help="low-rank optimizers' rank (default: 128; "
                   "apollo_mini 1; frugal takes --density 0.25)")
    p.add_argument("--density", type=float, help="the projected fraction of each low-rank "
                   "matrix, instead of --rank (FRUGAL's default 0.25)")
    p.add_argument("--state-dtype", dest="state_dtype", choices=("float32", "int8", "int4"))
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 0)")
    p.add_argument("--world-size", dest="world_size", type=n, default=1,
                   help="report measures this one process: 1 only (stages and offload run on a "
                   "one-rank group)" if budget else "ranks to predict for (default 1)")
    p.add_argument("--param-dtype", dest="param_dtype", choices=sorted(DTYPES))
    p.add_argument("--activations", dest="activation_policy", choices=("keep", "recompute", "swap"))
    p.add_argument("--offload", choices=("cpu", "nvme"), help="optimizer state tier")
    p.add_argument("--offload-params", dest="offload_params", choices=("cpu", "nvme"),
                   help="stage 3: where parameter shards live")
    p.add_argument("--nvme-path", dest="nvme_path", help="directory for the nvme swap files")
    if budget:  # (the estimator does not model a planner's budget: report only)
        p.add_argument("--activation-budget", dest="activation_budget", type=_budget,
                       help="run the activation planner under this budget ('50%%', '6MiB') "
                       "and add its predictions beside the measured ledger")
    p.add_argument("--json", help="also write the figures as JSON to this path")


def _budget(text: str) -> str:
    from memopt.activations.planner import parse_budget

    try:
        parse_budget(text, 1 << 30)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memopt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="predict peak memory per tier before a run")
    _workload_args(est, budget=False)
    est.add_argument("--recipe", help="estimate a memopt.Config YAML (a recipe) instead of the "
                     "built-in workload; --world-size and --json still apply, the workload "
                     "flags do not (pass overrides: sharding.stage=3, not --stage 3)")
    est.add_argument("overrides", nargs="*", help="with --recipe: section.key=value overrides")
    rep = sub.add_parser("report", help="measure a few steps and plot memory per tier")
    _workload_args(rep, budget=True)
    rep.add_argument("--steps", type=_positive_int, default=5)
    rep.add_argument("--interval", type=float, default=0.005, help="sampling period (s)")
    rep.add_argument("--out", default="memopt-report", help="output directory")
    rep.add_argument(
        "--exact-rss",
        action="store_true",
        help="mmap every allocation over 64 KiB (glibc) so RSS follows the live tensor bytes",
    )
    from memopt.cli import launch

    launch.add_arguments(sub.add_parser("run", help="launch a recipe YAML under torchrun"))
    return ap


#: ``memopt estimate`` workload flags (argparse dest) and the recipe key each one sets.
RECIPE_KEYS = {
    "model": ("--model", "model.preset"), "hidden": ("--hidden", "model.overrides.hidden_size"),
    "layers": ("--layers", "model.overrides.num_hidden_layers"),
    "heads": ("--heads", "model.overrides.num_attention_heads"),
    "intermediate": ("--intermediate", "model.overrides.intermediate_size"),
    "vocab": ("--vocab", "model.overrides.vocab_size"),
    "batch_size": ("--batch-size", "train.batch_size"), "seq_len": ("--seq-len", "train.seq_len"),
    "optimizer": ("--optimizer", "optimizer.name"), "rank": ("--rank", "optimizer.rank"),
    "density": ("--density", "optimizer.density"),
    "state_dtype": ("--state-dtype", "optimizer.state_dtype"),
    "stage": ("--stage", "sharding.stage"), "param_dtype": ("--param-dtype", "model.dtype"),
    "activation_policy": ("--activations", "activations.policy"),
    "offload": ("--offload", "sharding.offload"),
    "offload_params": ("--offload-params", "sharding.offload_params"),
    "nvme_path": ("--nvme-path", "sharding.nvme_path"),
}  # fmt: skip
#: Flag values the recipe key spells otherwise (a recipe's model is a preset size).
_RECIPE_VALUES = {"model": {"llama": "PRESET"},
                  "param_dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp32|bf16"}}


def refuse_workload_flags(args: argparse.Namespace) -> None:
    """With ``--recipe`` the recipe sets the workload: a workload flag would be ignored, so it
    is refused, naming the override that does apply (``--stage 3`` -> ``sharding.stage=3``)."""
    given = [(dest, getattr(args, dest)) for dest in RECIPE_KEYS
             if getattr(args, dest, None) is not None]
    if not given:
        return
    flags = " ".join(f"{RECIPE_KEYS[d][0]} {v}" for d, v in given)
    keys = " ".join(f"{RECIPE_KEYS[d][1]}={_RECIPE_VALUES.get(d, {}).get(v, v)}"
                    for d, v in given)
    raise SystemExit(f"memopt estimate: {flags}: the recipe sets the workload, so these flags "
                     f"would be ignored; pass overrides after the recipe instead: {keys}")


def _estimate(args: argparse.Namespace) -> int:
    if args.recipe is not None:
        refuse_workload_flags(args)
        from memopt.config import Config
        from memopt.config.estimate import estimate

        est = estimate(Config.from_yaml(args.recipe, args.overrides), args.world_size)
    elif args.overrides:
        raise SystemExit(f"memopt estimate: overrides {args.overrides} need --recipe RECIPE.yaml")
    else:
        est = Workload.from_args(args).estimate()
    print(est)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(est.to_dict(), f, indent=1)
    return 0


def _report(args: argparse.Namespace) -> int:
    from memopt.memory import Timeline

    w = Workload.from_args(args)
    if w.world_size != 1:
        raise SystemExit(
            f"memopt report: --world-size {w.world_size}: report measures this one process "
            "(any --stage, --offload, --offload-params: on a one-rank group); for "
            f"{w.world_size} ranks, memopt estimate --world-size {w.world_size} predicts the "
            "peak per rank, and memopt run RECIPE.yaml --nproc-per-node N trains on N ranks"
        )
    if args.exact_rss:
        from memopt.memory.timeline import mmap_large_allocations

        mmap_large_allocations()
    est = w.estimate()
    arena = None
    if w.offload is not None or est.peak["pinned_host"]:  # the pinned tier (offloaded state,
        # swapped activations): drawn as its own curve and compared apart from the host RSS
        from memopt.offload import default_arena

        arena = default_arena()
        if w.offload is None:  # (an offload run's warm-up maps it already)
            _map_ahead(arena, est.peak["pinned_host"])
    tl = Timeline(interval=args.interval, arena=arena)
    notes: list[str] = []
    with _workload.one_rank_group(w):  # (sharded: the group memopt run would start)
        _workload.run(w, args.steps, tl, notes=notes)
    paths = tl.write(args.out, estimate=est)
    if notes:  # the planner's predictions beside what the ledger measured
        with open(paths["md"], "a") as f:
            f.write("\n## Activation planner\n\n```\n" + "\n".join(notes) + "\n```\n")
    print(paths["md"].read_text())
    print(f"wrote {paths['png']} and {paths['md']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured_peak": tl.peak(), "estimate": est.to_dict()}, f, indent=1)
    return 0


def _map_ahead(arena: Any, nbytes: int) -> None:
    """Map (and fault in) the arena's room for ``nbytes`` before the timeline's baseline, as
    the offload path's warm-up does: the arena maps whole chunks (256 MiB) at its first
    request, which would otherwise land in the measured host RSS (a swap run read 0.28)."""
    if nbytes <= 0:
        return
    block = arena.alloc(nbytes)
    try:
        arena.tensor(block).zero_()  # resident even where pinning fell back to lazy pages
    finally:
        arena.free(block)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # overrides and options may interleave: run parses its own
        from memopt.cli import launch

        return launch.main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return {"estimate": _estimate, "report": _report}[args.command](args)
    except (ValueError, OSError) as e:  # bad input (a rank for AdamW, a missing recipe): no
        # traceback
        print(f"memopt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
