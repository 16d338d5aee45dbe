"""ZeRO sharding side by side: memopt stages 1/2/3 against DeepSpeed ZeRO 1/2/3 and FSDP2.

What it measures: a LLaMA-60M-shaped ``transformers.LlamaForCausalLM`` (hidden 512, 8 layers,
intermediate 1376, 8 heads, vocab 32000, untied head: 58M parameters, fp32, random init)
trained on random tokens by 2 ranks over gloo (CPU, ``OMP_NUM_THREADS=1`` per rank). Every
system steps the same optimizer, ``torch.optim.AdamW(fused=True)`` (lr 1e-4), so the
comparison isolates the sharding: memopt's ``ShardedOptimizer`` wraps it (stages 1/2:
``memopt.shard(..., deepspeed_config={"stage": S})``, i.e. memopt's defaults: whole_tensor
layout, 25 MiB buckets; stage 3: FSDP2 per decoder layer plus the root, memopt's optimizer
on the row shards), DeepSpeed gets it as a client optimizer with
``{"zero_optimization": {"stage": S}}`` (DeepSpeed's defaults otherwise), FSDP2 is
``fully_shard`` per decoder layer then the root with the optimizer on its DTensors.

Per configuration and repeat, a fresh ``torchrun --nproc-per-node 2`` runs ``--warmup``
steps and then times ``--steps`` steps (forward, backward, step, zero_grad); it reports per
rank the median step time, the peak RSS (``VmHWM``), the RSS after the imports and before
the model was built (so ``peak - base`` is what the model and training added) and the bytes
of the optimizer state tensors this rank holds (counted the same way for every system:
unique storages in the torch optimizer's ``state``, DTensors by their local shard).
Configurations run in a rotated order in each repeat so load from other processes hits them
alike; the tables take, per configuration, the median over repeats of the slower rank's
median step time and the larger rank's memory. A configuration that fails (DeepSpeed not
installed, a crash, a timeout) is printed with its error and not run again (the tables hold
its completed runs, if any), and after the tables the script exits with status 1;
``--configs`` leaves a configuration out explicitly.

Usage::

    python benchmarks/shard_bench.py                       # all 7 configurations, 2 repeats
    python benchmarks/shard_bench.py --configs memopt2,deepspeed2 --repeats 3
    python benchmarks/shard_bench.py --quick               # tiny model, smoke test
    python benchmarks/shard_bench.py --configs memopt3,deepspeed3,fsdp2 --meta-init
                                    # stage 3 built lazily: memopt/FSDP2 on the meta device,
                                    # DeepSpeed under zero.Init (no rank holds the whole model)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _peers import exit_if_failed
from _procstat import rss_kib  # benchmarks/ is on sys.path when run as a script

CONFIGS = ("memopt1", "deepspeed1", "memopt2", "deepspeed2", "memopt3", "deepspeed3", "fsdp2")
MIB = 2**20


# -- worker side (one rank of one configuration) -----------------------------------------
def build_model(quick: bool, config: str = "", meta: bool = False) -> Any:
    """The model; with ``meta`` built the way each system avoids a whole copy per rank:
    memopt3 and fsdp2 on the meta device, deepspeed3 under ``deepspeed.zero.Init``."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 512}
        if quick
        else {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
              "vocab_size": 32000}
    )  # fmt: skip
    cfg = LlamaConfig(num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=False, **size)  # fmt: skip
    torch.manual_seed(0)
    lazy: Any = contextlib.nullcontext()
    if meta and config in ("memopt3", "fsdp2"):
        lazy = torch.device("meta")
    elif meta and config == "deepspeed3":
        import deepspeed

        lazy = deepspeed.zero.Init()
    with lazy:
        return LlamaForCausalLM(cfg)


def _state_bytes(opt: Any) -> int:
    """Bytes of the tensors in a torch optimizer's state (unique storages; DTensor: local)."""
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for t in st.values():
            local = t.to_local() if hasattr(t, "to_local") else t
            if hasattr(local, "untyped_storage") and local.numel() > 1:
                s = local.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _setup(name: str, model: Any, lr: float, micro_batch: int) -> tuple[Any, Callable, Any]:
    """Shard ``model`` per ``name``; return (model or engine, train-step function, optimizer)."""
    import torch

    stage = int(name[-1])
    if name.startswith("deepspeed"):
        import deepspeed

        ds_cfg = {"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": {
            "stage": stage}, "zero_allow_untested_optimizer": True}  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        engine, dopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)

        def ds_step(x: Any) -> None:
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()

        return engine, ds_step, dopt.optimizer
    if name == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        meta = next(model.parameters()).is_meta
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if meta:  # FSDP2's recipe: allocate the shards, then initialize on them
            model.to_empty(device="cpu")
            with torch.no_grad():
                model.apply(model._init_weights)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    else:
        import memopt
        from memopt.sharding import FSDPOptions

        inner = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        lazy = FSDPOptions(init_fn=model._init_weights) if stage == 3 else None
        model, opt = memopt.shard(model, inner, deepspeed_config={"stage": stage}, fsdp=lazy)

    def step(x: Any) -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, getattr(opt, "inner", opt)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    if args.config.startswith("deepspeed"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    import transformers  # noqa: F401  (imported before the baseline: not training memory)

    import memopt  # noqa: F401

    base_kib = rss_kib("VmRSS")
    model = build_model(args.quick, args.config, args.meta_init)
    n_params = sum(p.numel() for p in model.parameters())
    _, step, opt = _setup(args.config, model, 1e-4, args.batch)
    g = torch.Generator().manual_seed(1000 + rank)
    vocab = 512 if args.quick else 32000
    times = []
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        t0 = time.perf_counter()
        step(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mine = {
        "rank": rank,
        "step_s": statistics.median(times),
        "peak_kib": rss_kib("VmHWM"),
        "base_kib": base_kib,
        "state_bytes": _state_bytes(opt),
        "params": n_params,
    }
    got: list[Any] = [None] * world
    dist.all_gather_object(got, mine)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(got, f)
    from memopt.sharding import shutdown_distributed
    shutdown_distributed()


# -- driver side -------------------------------------------------------------------------
def run_one(config: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", os.path.abspath(__file__), "--worker", "--config",
               config, "--out", out, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq", str(args.seq)] + (
            ["--quick"] if args.quick else []) + (
            ["--meta-init"] if args.meta_init else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"{config} failed (rc {proc.returncode}):\n{tail}")
        with open(out) as f:
            ranks = json.load(f)
        print(f"  {config:11s} {time.time() - t0:6.1f} s wall: "
              + "  ".join(f"r{r['rank']} {r['step_s'] * 1e3:.0f} ms" for r in ranks),
              flush=True)  # fmt: skip
        return list(ranks)


def summarize(runs: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Median over repeats of the slowest rank's step time and the largest rank's memory."""

    def med(key: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(max(key(r) for r in ranks) for ranks in runs)

    return {
        "step_ms": med(lambda r: r["step_s"] * 1e3),
        "step_ms_min": min(max(r["step_s"] for r in ranks) for ranks in runs) * 1e3,
        "peak_mib": med(lambda r: r["peak_kib"] / 1024),
        "delta_mib": med(lambda r: (r["peak_kib"] - r["base_kib"]) / 1024),
        "state_mib": med(lambda r: r["state_bytes"] / MIB),
        "params": runs[0][0]["params"],
    }


def tables(res: dict[str, dict[str, float]], repeats: int) -> str:
    lines = [
        f"| configuration | step time (ms, median of {repeats}) | min | peak RSS/rank (MiB) "
        "| peak - base (MiB) | optimizer state/rank (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in res.items():
        cells = [f"{s['step_ms']:.0f}", f"{s['step_ms_min']:.0f}", f"{s['peak_mib']:.0f}",
                 f"{s['delta_mib']:.0f}", f"{s['state_mib']:.1f}"]  # fmt: skip
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| stage | step time memopt/DeepSpeed | peak RSS memopt/DeepSpeed "
              "| peak - base memopt/DeepSpeed | memopt/FSDP2 step (stage 3) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for s in (1, 2, 3):
        m, d = res.get(f"memopt{s}"), res.get(f"deepspeed{s}")
        if m is None or d is None:
            continue
        f = res.get("fsdp2")
        vs_fsdp = f"{m['step_ms'] / f['step_ms']:.2f}" if (f and s == 3) else ""
        cells = [f"{m[k] / d[k]:.2f}" for k in ("step_ms", "peak_mib", "delta_mib")]
        lines.append(f"| {s} | {' | '.join(cells)} | {vs_fsdp} |")
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()  # fmt: skip
    except OSError:
        commit = "?"
    versions = [f"torch {torch.__version__}"]
    for mod in ("deepspeed", "transformers"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} missing")
    return "\n".join([
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}",
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"{platform.platform()}; {', '.join(versions)}; commit {commit}",
        f"workload: 2 ranks gloo, batch {args.batch} x seq {args.seq} per rank, "
        f"{args.warmup} warm-up + {args.steps} timed steps per run",
        f"load average at start: {_load()} (other processes share these cores)",
    ])  # fmt: skip


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps: a smoke test")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--meta-init", action="store_true",
                   help="stage 3 and FSDP2 build the model lazily (meta device / zero.Init)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.seq = 2, 1, 1, 16
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; choose from {','.join(CONFIGS)}")
    print(header(args), flush=True)
    runs: dict[str, list[list[dict[str, Any]]]] = {c: [] for c in configs}
    failed: dict[str, str] = {}
    for rep in range(args.repeats):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        print(f"repeat {rep + 1}/{args.repeats}: {' '.join(order)}", flush=True)
        for c in order:
            if c in failed:
                continue
            try:
                runs[c].append(run_one(c, args))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failed[c] = str(exc)
                print(f"  {c} FAILED: {str(exc)[-600:]}", flush=True)
    print(f"load average at end: {_load()}")
    res = {c: summarize(r) for c, r in runs.items() if r}
    if res:
        n = next(iter(res.values()))["params"]
        print(f"\nmodel: {n / 1e6:.1f}M parameters\n")
        print(tables(res, args.repeats))
    for c, why in failed.items():
        print(f"\n{c}: not measured ({why.splitlines()[0]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": res, "runs": runs, "failed": failed}, f, indent=1)
    exit_if_failed("shard_bench", list(failed))  # leave a configuration out with --configs


if __name__ == "__main__":
    main()
