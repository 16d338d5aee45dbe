"""memopt's memory estimate against measured peaks, DeepSpeed's and accelerate's estimators.

What it measures: LLaMA-shaped ``transformers.LlamaForCausalLM`` models (random init, fp32,
untied head; "small": hidden 384, 6 layers, vocab 16000, 23M parameters; "medium": hidden 512,
8 layers, vocab 32000, 58M parameters), batch 4 x 256 tokens, trained for ``--steps`` steps
on the CPU after a one-step warm-up of a micro model (so lazily loaded code is in the
baseline). Per configuration:

- predicted: ``memopt.memory.estimate`` (meta device, nothing allocated) host total per rank;
- measured: ``VmHWM`` growth over the ``VmRSS`` baseline taken right before the model is
  built (``memopt.memory.Timeline``), with glibc told to mmap every allocation over 64 KiB
  (``mmap_large_allocations``) so freed tensors leave the resident set; the "default malloc"
  row measures AdamW once more with glibc's own thresholds, for the allocator's share;
- DeepSpeed: ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_...`` (the
  functions behind ``estimate_zero{2,3}_model_states_mem_needs_all_live``) per GPU, no
  offload: model states only, and for mixed precision (2 B fp16 params + 18 B / W);
- accelerate: ``estimate-memory``'s arithmetic (``calculate_maximum_sizes`` on the locally
  built empty model, then ``estimate_training_usage(..., "float32")``, peak = the largest of
  its entries, as its table prints): the hub download it normally does is not needed.

Optimizers: AdamW, GaLore (rank 128), APOLLO-Mini, 8-bit AdamW in one process; AdamW at
ZeRO stage 1, 2 and 3 (memopt's FSDP2 path) on 2 gloo ranks (``torchrun --nproc-per-node 2``;
per-rank figures, the larger rank reported).

Usage::

    python benchmarks/estimator_bench.py                     # both models, all configurations
    python benchmarks/estimator_bench.py --models small --no-dist --steps 1
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, dict[str, Any]] = {
    "small": {"hidden": 384, "layers": 6, "heads": 6, "vocab": 16000},
    "medium": {"hidden": 512, "layers": 8, "heads": 8, "vocab": 32000},
}
BATCH: dict[str, Any] = {"batch_size": 4, "seq_len": 256}
SINGLE: list[dict[str, Any]] = [
    {"optimizer": "adamw"},
    {"optimizer": "galore", "rank": 128},
    {"optimizer": "apollo_mini"},
    {"optimizer": "adamw", "state_dtype": "int8"},
]


def measure(model: str, case: dict[str, Any], steps: int) -> dict[str, Any]:
    from memopt.cli._workload import Workload, run
    from memopt.memory import Timeline

    w = Workload(**MODELS[model], **BATCH, **case)
    est = w.estimate()
    tl = Timeline()
    run(w, steps, tl)
    return {"model": model, "case": case, "measured": tl.peak()["host"],
            "predicted": est.host_total, "breakdown": est.breakdown["device"]}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    from memopt.memory.timeline import mmap_large_allocations

    warnings.simplefilter("ignore")
    rank = int(os.environ.get("RANK", "0"))
    if args.malloc == "mmap":
        assert mmap_large_allocations()
    if args.dist:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        cases = [{"stage": s, "world_size": dist.get_world_size()} for s in (1, 2, 3)]
    else:
        cases = SINGLE if args.malloc == "mmap" else SINGLE[:1]
    rows = [measure(args.child, c, args.steps) for c in cases]
    for r in rows:
        r["malloc"] = args.malloc
    Path(args.out, f"{args.child}-{args.malloc}-{int(args.dist)}-{rank}.json").write_text(
        json.dumps(rows)
    )


def peers(model: str) -> dict[str, float]:
    """DeepSpeed's and accelerate's estimates for ``model`` (bytes)."""
    import torch
    from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from transformers import LlamaForCausalLM

    from memopt.cli._workload import Workload

    with torch.device("meta"):
        m = LlamaForCausalLM(Workload(**MODELS[model]).llama_config())
    n = sum(p.numel() for p in m.parameters())
    largest = max(sum(p.numel() for p in b.parameters()) for b in m.model.layers)
    total, _ = calculate_maximum_sizes(m)
    out = {"params": n, "accelerate": max(estimate_training_usage(total, "float32").values())}
    for w in (1, 2):
        out[f"ds2_w{w}"] = estimate_zero2_model_states_mem_needs(n, w, 1, cpu_offload=False)[1]
        out[f"ds3_w{w}"] = estimate_zero3_model_states_mem_needs(
            n, largest, w, 1, cpu_offload=False, cpu_offload_params=False
        )[1]
    return out


def spawn(model: str, out: str, steps: int, malloc: str, dist: bool) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    me = [str(Path(__file__).resolve()), "--child", model, "--out", out,
          "--steps", str(steps), "--malloc", malloc]  # fmt: skip
    if dist:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            *me,
            "--dist",
        ]
    else:
        cmd = [sys.executable, *me]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def label(r: dict[str, Any]) -> str:
    c = dict(r["case"])
    if "stage" in c:
        return f"adamw, ZeRO-{c['stage']}, 2 ranks"
    name = c.pop("optimizer")
    extra = ", ".join(f"{k} {v}" for k, v in c.items())
    mal = "" if r["malloc"] == "mmap" else ", default malloc"
    return f"{name}{' (' + extra + ')' if extra else ''}{mal}"


def _cell(b: float, measured: float) -> str:
    """``MiB (estimate / measured)``."""
    return f"{b / 2**20:.0f} ({b / measured:.2f})"


def table(rows: list[dict[str, Any]], peer: dict[str, dict[str, float]]) -> str:
    mib = 2**20
    lines = [
        "| model | configuration | memopt predicted MiB | measured MiB | predicted / measured "
        "| DeepSpeed ZeRO-2 MiB (/ measured) | DeepSpeed ZeRO-3 MiB (/ measured) "
        "| accelerate MiB (/ measured) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = peer[r["model"]]
        w = r["case"].get("world_size", 1)
        cell = functools.partial(_cell, measured=r["measured"])
        ds = f"{cell(p[f'ds2_w{w}'])} | {cell(p[f'ds3_w{w}'])}" if r["case"].get(
            "optimizer", "adamw") == "adamw" else "- | -"  # fmt: skip
        acc = cell(p["accelerate"]) if w == 1 and "optimizer" in r["case"] else "-"
        lines.append(
            f"| {r['model']} ({p['params'] / 1e6:.0f}M) | {label(r)} | {r['predicted'] / mib:.1f} "
            f"| {r['measured'] / mib:.1f} | {r['predicted'] / r['measured']:.3f} | {ds} | {acc} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,medium")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-dist", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--malloc", default="mmap", help=argparse.SUPPRESS)
    ap.add_argument("--dist", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    start = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as out:
        models = args.models.split(",")
        for m in models:
            spawn(m, out, args.steps, "mmap", False)
            spawn(m, out, args.steps, "default", False)
            if not args.no_dist:
                spawn(m, out, args.steps, "mmap", True)
        rows = _collect(out, models)
    warnings.simplefilter("ignore")
    peer = {m: peers(m) for m in models}
    print(f"# estimator_bench {start:%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}")  # fmt: skip
    print(table(rows, peer))


def _collect(out: str, models: list[str]) -> list[dict[str, Any]]:
    """Rows in model order; for 2 ranks the rank with the larger measured peak."""
    rows: list[dict[str, Any]] = []
    for m in models:
        for kind in ("mmap-0", "default-0", "mmap-1"):
            files = sorted(Path(out).glob(f"{m}-{kind}-*.json"))
            per_rank = [json.loads(f.read_text()) for f in files]
            for i in range(len(per_rank[0]) if per_rank else 0):
                rows.append(max((r[i] for r in per_rank), key=lambda r: r["measured"]))
    return rows


if __name__ == "__main__":
    main()
