"""Optimizer step time and state bytes: memopt's low-rank optimizers against their references.

What it measures, per model size and refresh gap, all in one process:

- the matrices of ONE LLaMA transformer block (q, k, v, o: h x h; gate, up: i x h;
  down: h x i, nn.Linear layout out x in) for the GaLore paper's LLaMA-60M (h 512,
  i 1376, 8 layers, rank 128) and LLaMA-350M (h 1024, i 2736, 24 layers, rank 256);
  stepping whole models 400+ times for a dozen optimizers does not fit a 2-core CPU.
  Whole-model state bytes are the per-block numbers times the number of layers
  (projected matrices only; embeddings, norms and the head are left out).
- step time amortized over whole refresh gaps: a fresh optimizer is timed from its
  step 0 for ``2 * gap`` steps by default, so the window holds exactly two subspace
  refreshes (steps 0 and gap), the steady-state rate of one per gap. A separate
  throw-away instance runs the warm-up steps first, so the timed instance's step-0
  refresh is inside the window. Optimizers without a refresh (torch AdamW,
  bitsandbytes AdamW8bit) have a stationary step time; AdamW8bit, which runs a slow
  reference kernel on CPU, is timed over ``--flat-steps`` steps only.
- the optimizers are stepped interleaved: at step t every optimizer takes its step t
  (order rotated each step) on its own copy of the weights, with the same gradients
  from a pre-generated pool of ``--pool`` sets reused cyclically. Load from other
  processes then hits every optimizer alike instead of whichever ran at the time.
- state bytes three ways: memopt's ``state_bytes`` (persistent, plus regenerable
  ``cache``), an independent count of the tensors in ``optimizer.state`` (plus the
  reference projectors' ``ortho_matrix``), and the storage those tensors keep alive
  (a slice of a bigger tensor holds the whole buffer). Each is checked against the
  formula in ``memopt/optim/accounting.py``.

Usage::

    python benchmarks/optim_bench.py                       # 60m,350m at gap 200 and 50
    python benchmarks/optim_bench.py --sizes 60m --gaps 200 --out results.json
    python benchmarks/optim_bench.py --quick               # tiny smoke test (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

# The OpenMP wait policy is left as the environment has it: unset by default (libgomp's
# spin-then-sleep, what a training script gets). On a shared, loaded machine spin-waiting made
# every optimizer's step up to 10x slower; OMP_WAIT_POLICY=PASSIVE keeps such runs sane, but it
# charges a thread wake-up (~60-90 us on a VM) to every parallel region, so the implementation
# with more, smaller ops (the references) pays more and the ratios flatter memopt
# (docs/benchmarks.md, "what the OpenMP wait policy does to the ratios"). Until 2026-11-23 this
# script set PASSIVE itself. =default is accepted as "unset". Must precede torch.
if os.environ.get("OMP_WAIT_POLICY", "").lower() == "default":
    del os.environ["OMP_WAIT_POLICY"]

import torch  # noqa: E402

F32 = 4
SIZES: dict[str, dict[str, int]] = {
    "60m": {"hidden": 512, "inter": 1376, "layers": 8, "rank": 128},
    "350m": {"hidden": 1024, "inter": 2736, "layers": 24, "rank": 256},
    "1b": {"hidden": 2048, "inter": 5461, "layers": 24, "rank": 512},  # GPU runs
    "tiny": {"hidden": 64, "inter": 172, "layers": 2, "rank": 16},  # --quick only
}
GALORE_SCALE, MINI_SCALE, DENSITY, NATURAL_HISTORY, BNB_BLOCK = 0.25, 128.0, 0.25, 4, 256
# (memopt optimizer, reference, target ratio of mean step times)
TARGETS = [
    ("memopt AdamW", "torch AdamW (fused)", 1.1),
    ("memopt GaLore svd", "galore-torch GaLore", 0.5),
    ("memopt GaLore rsvd", "galore-torch GaLore", 0.5),
    ("memopt GaLore subspace", "galore-torch GaLore", 0.5),
    ("memopt GaLore gram", "galore-torch GaLore", 0.5),
    ("memopt GaLore rsvd bf16-mm", "galore-torch GaLore", 0.5),
    ("memopt GaLore subspace bf16-mm", "galore-torch GaLore", 0.5),
    ("memopt APOLLO", "apollo-torch APOLLO", 0.7),
    ("memopt APOLLO bf16-mm", "apollo-torch APOLLO", 0.7),
    ("memopt APOLLO-Mini", "apollo-torch APOLLO-Mini", 0.7),
]


def block_shapes(hidden: int, inter: int) -> list[tuple[str, tuple[int, int]]]:
    """The 7 weight matrices of one LLaMA block, nn.Linear layout (out, in)."""
    h, i = hidden, inter
    return [("q", (h, h)), ("k", (h, h)), ("v", (h, h)), ("o", (h, h)),
            ("gate", (i, h)), ("up", (i, h)), ("down", (h, i))]


# -- state-byte formulas (memopt/optim/accounting.py), (persistent, cache) per block ----------
def _de(shape: tuple[int, int]) -> tuple[int, int]:
    return max(shape), min(shape)


def f_adamw(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # 2 m n moments; torch also keeps `step` as a 0-d fp32 tensor per parameter.
    return sum(2 * m * n * F32 + F32 for m, n in shapes), 0


def f_bnb8(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # 2 m n uint8 codes + one fp32 absmax per 256-block per moment + 2 shared 256-entry qmaps.
    per = sum(2 * m * n + 2 * math.ceil(m * n / BNB_BLOCK) * F32 for m, n in shapes)
    return per + 2 * 256 * F32, 0


def f_memopt_adamw(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # 2 m n fp32 moments; memopt's step counter is a Python int, not a tensor.
    return sum(2 * m * n * F32 for m, n in shapes), 0


def f_memopt_int8(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # 2 m n uint8 codes + one fp32 absmax per 256-element block per moment; the code maps are
    # module constants, not state.
    return sum(2 * m * n + 2 * math.ceil(m * n / 256) * F32 for m, n in shapes), 0


def f_galore(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # 2 d r moments + e r basis.
    return sum((2 * d * rank + e * rank) * F32 for d, e in map(_de, shapes)), 0


def f_natural(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # GaLore + s d r projected-gradient history + its s x s Gram matrix.
    s = NATURAL_HISTORY
    extra = sum((s * d * rank + s * s) * F32 for d, _ in map(_de, shapes))
    return f_galore(shapes, rank, gap, steps)[0] + extra, 0


def f_apollo_ref(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # apollo-torch keeps the e x r Gaussian matrix in its projector: persistent.
    return sum((2 * d * rank + e * rank + 1) * F32 for d, e in map(_de, shapes)), 0


def f_apollo(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # 2 d r moments + 1 limiter scalar; the e x r matrix is a cache regenerated from a seed.
    pers = sum((2 * d * rank + 1) * F32 for d, _ in map(_de, shapes))
    return pers, sum(e * rank * F32 for _, e in map(_de, shapes))


def f_frugal_svd(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # rank rho*e of the reduced side: 2 d (rho e) moments + e (rho e) basis.
    tot = 0
    for d, e in map(_de, shapes):
        r = max(1, min(e, round(DENSITY * e)))
        tot += (2 * d * r + e * r) * F32
    return tot, 0


def f_frugal_block(shapes: list, rank: int, gap: int, steps: int) -> tuple[int, int]:
    # 2 m n for the round(rho * n_tensors) tensors active at the last step (descending order).
    n = len(shapes)
    k = round(n * DENSITY)
    seq = list(reversed(range(n)))
    start = ((steps - 1) // gap) * k
    active = {seq[(start + j) % n] for j in range(k)}
    return sum(2 * shapes[j][0] * shapes[j][1] * F32 for j in active), 0


# -- optimizer factories -------------------------------------------------------------------
def _lowrank(params: list, rank: int, gap: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"params": params, "rank": rank, "update_proj_gap": gap, "proj_type": "std", **extra}]


def _galore_torch(ps: list, r: int, gap: int) -> torch.optim.Optimizer:
    import galore_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return galore_torch.GaLoreAdamW(_lowrank(ps, r, gap, scale=GALORE_SCALE), lr=1e-3)


def _apollo_torch(ps: list, r: int, gap: int, mini: bool) -> torch.optim.Optimizer:
    import apollo_torch

    kw = {"scale": MINI_SCALE, "scale_type": "tensor"} if mini else {"scale": 1.0,
                                                                      "scale_type": "channel"}
    return apollo_torch.APOLLOAdamW(_lowrank(ps, 1 if mini else r, gap, proj="random", **kw),
                                    lr=1e-3)


def _memopt(cls_name: str, **extra: Any) -> Callable[[list, int, int], torch.optim.Optimizer]:
    def build(ps: list, r: int, gap: int) -> torch.optim.Optimizer:
        from memopt import optim as mo

        cls = getattr(mo, cls_name)
        if cls_name == "FrugalAdamW":
            groups = [{"params": ps, "density": DENSITY, "update_proj_gap": gap, **extra}]
        elif cls_name == "ApolloMini":
            groups = _lowrank(ps, 1, gap)
        elif cls_name == "ApolloAdamW":
            groups = _lowrank(ps, r, gap, proj="random", scale=1.0, scale_type="channel",
                              **extra)
        else:
            groups = _lowrank(ps, r, gap, scale=GALORE_SCALE, **extra)
        return cls(groups, lr=1e-3)

    return build


def _memopt_adamw(ps: list, state_dtype: str | None) -> torch.optim.Optimizer:
    from memopt import optim as mo

    return mo.AdamW(ps, lr=1e-3, weight_decay=0.0, state_dtype=state_dtype)


def _bnb8(ps: list, r: int, gap: int) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    # weight_decay given explicitly: bitsandbytes' default is 0.01, memopt's pair runs 0.0
    return bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.0)


@dataclass
class Spec:
    name: str
    impl: str  # "torch" | "bnb" | "galore-torch" | "apollo-torch" | "memopt"
    build: Callable[[list, int, int], torch.optim.Optimizer]
    formula: Callable[..., tuple[int, int]]
    refreshes: bool = True
    flat_limited: bool = False  # timed over --flat-steps only


SPECS = [
    Spec("torch AdamW (fused)", "torch",
         # weight_decay=0.0 as memopt's AdamW below (torch's default is 0.01)
         lambda ps, r, g: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, fused=True), f_adamw,
         refreshes=False),
    Spec("memopt AdamW", "memopt", lambda ps, r, g: _memopt_adamw(ps, None), f_memopt_adamw,
         refreshes=False),
    Spec("bnb AdamW8bit", "bnb", _bnb8, f_bnb8, refreshes=False, flat_limited=True),
    Spec("memopt AdamW int8", "memopt", lambda ps, r, g: _memopt_adamw(ps, "int8"),
         f_memopt_int8, refreshes=False),
    Spec("galore-torch GaLore", "galore-torch", _galore_torch, f_galore),
    Spec("memopt GaLore svd", "memopt", _memopt("GaLoreAdamW", proj="svd"), f_galore),
    Spec("memopt GaLore rsvd", "memopt", _memopt("GaLoreAdamW", proj="rsvd"), f_galore),
    Spec("memopt GaLore subspace", "memopt", _memopt("GaLoreAdamW", proj="subspace"), f_galore),
    Spec("memopt GaLore gram", "memopt", _memopt("GaLoreAdamW", proj="gram"), f_galore),
    # matmul_dtype="bfloat16": the projection GEMMs in bf16 (fp32 weights, moments, basis)
    Spec("memopt GaLore rsvd bf16-mm", "memopt",
         _memopt("GaLoreAdamW", proj="rsvd", matmul_dtype="bfloat16"), f_galore),
    Spec("memopt GaLore subspace bf16-mm", "memopt",
         _memopt("GaLoreAdamW", proj="subspace", matmul_dtype="bfloat16"), f_galore),
    Spec("memopt NaturalGaLore", "memopt", _memopt("NaturalGaLoreAdamW"), f_natural),
    Spec("apollo-torch APOLLO", "apollo-torch",
         lambda ps, r, g: _apollo_torch(ps, r, g, False), f_apollo_ref),
    Spec("memopt APOLLO", "memopt", _memopt("ApolloAdamW"), f_apollo),
    Spec("memopt APOLLO bf16-mm", "memopt", _memopt("ApolloAdamW", matmul_dtype="bfloat16"),
         f_apollo),
    Spec("apollo-torch APOLLO-Mini", "apollo-torch",
         lambda ps, r, g: _apollo_torch(ps, r, g, True),
         lambda s, r, g, n: f_apollo_ref(s, 1, g, n)),
    Spec("memopt APOLLO-Mini", "memopt", _memopt("ApolloMini"),
         lambda s, r, g, n: f_apollo(s, 1, g, n)),
    Spec("memopt FRUGAL svd", "memopt", _memopt("FrugalAdamW", proj="svd"), f_frugal_svd),
    Spec("memopt FRUGAL block", "memopt", _memopt("FrugalAdamW", proj="block"), f_frugal_block),
]


# -- measuring state -----------------------------------------------------------------------
def _state_tensors(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """Every tensor an optimizer's state holds, with its key (reference projectors included)."""
    out: list[tuple[str, torch.Tensor]] = []
    for st in opt.state.values():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                out.append((str(key), v))
            elif hasattr(v, "ortho_matrix"):  # galore-torch / apollo-torch projector object
                mats = v.ortho_matrix if isinstance(v.ortho_matrix, list) else [v.ortho_matrix]
                out += [(f"{key}.ortho_matrix", t) for t in mats if isinstance(t, torch.Tensor)]
    return out


def measure_state(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Logical bytes (numel x itemsize) split persistent / cache, and storage bytes held."""
    seen_view: set[tuple[int, int, tuple[int, ...]]] = set()
    seen_storage: set[int] = set()
    pers = cache = held = 0
    for key, t in _state_tensors(opt):
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if view not in seen_view:
            seen_view.add(view)
            size = t.numel() * t.element_size()
            if key.startswith("cache_"):
                cache += size
            else:
                pers += size
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen_storage:
            seen_storage.add(ptr)
            held += t.untyped_storage().nbytes()
    return {"persistent": pers, "cache": cache, "held": held}


# -- the timed run -------------------------------------------------------------------------
@dataclass
class Run:
    spec: Spec
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer
    limit: int
    times: list[float] = field(default_factory=list)


DEVICE = torch.device("cpu")  # set by --device


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timers measure it (no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_grad_pool(shapes: list, n: int, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen) * 1e-2).to(DEVICE) for s in shapes]
            for _ in range(n)]


def fresh_params(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(w.clone()) for w in weights]


def step_with(run: Run, grads: list[torch.Tensor]) -> float:
    for p, g in zip(run.params, grads, strict=True):
        p.grad = g
    sync()
    t0 = time.perf_counter()
    run.opt.step()
    sync()
    return time.perf_counter() - t0


def build_runs(specs: list[Spec], weights: list, pool: list, rank: int, gap: int,
               steps: int, flat_steps: int, warmup: int) -> list[Run]:
    runs = []
    for spec in specs:
        warm_params = fresh_params(weights)
        warm = Run(spec, warm_params, spec.build(warm_params, rank, gap), warmup)
        for t in range(warmup):  # a throw-away instance: the timed one starts at its step 0
            step_with(warm, pool[t % len(pool)])
        del warm
        ps = fresh_params(weights)
        limit = min(steps, flat_steps) if spec.flat_limited else steps
        runs.append(Run(spec, ps, spec.build(ps, rank, gap), limit))
    return runs


def run_interleaved(runs: list[Run], pool: list, steps: int, log_every: int) -> int:
    """Step every run ``steps`` times, interleaved; returns the steps completed.

    Ctrl-C (SIGINT) stops early and keeps what was timed (the report says TRUNCATED).
    """
    t_start = time.perf_counter()
    try:
        for t in range(steps):
            grads = pool[t % len(pool)]
            k = t % len(runs)
            for run in runs[k:] + runs[:k]:  # rotate the order each step
                if t < run.limit:
                    run.times.append(step_with(run, grads))
            if log_every and (t + 1) % log_every == 0:
                print(f"  step {t + 1}/{steps}  {time.perf_counter() - t_start:.0f}s elapsed",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        done = min(len(r.times) for r in runs if r.limit == steps)
        print(f"  interrupted: keeping {done} complete steps", file=sys.stderr, flush=True)
        for r in runs:
            del r.times[done:]
        return done
    return steps


# -- summaries -----------------------------------------------------------------------------
def summarize(run: Run, shapes: list, rank: int, gap: int) -> dict[str, Any]:
    ms = [t * 1e3 for t in run.times]
    is_ref = [run.spec.refreshes and t % gap == 0 for t in range(len(ms))]
    steady = [x for x, r in zip(ms, is_ref, strict=True) if not r]
    refresh = [x for x, r in zip(ms, is_ref, strict=True) if r]
    meas = measure_state(run.opt)
    f_pers, f_cache = run.spec.formula(shapes, rank, gap, run.limit)
    out: dict[str, Any] = {
        "name": run.spec.name, "impl": run.spec.impl, "steps": len(ms),
        "refreshes": len(refresh), "mean_ms": statistics.fmean(ms),
        "steady_median_ms": statistics.median(steady) if steady else float("nan"),
        "refresh_mean_ms": statistics.fmean(refresh) if refresh else None,
        "measured": meas, "formula": {"persistent": f_pers, "cache": f_cache},
        "finite": all(bool(torch.isfinite(p).all()) for p in run.params),
    }
    state, cache = meas["persistent"], meas["cache"]
    if run.spec.impl == "memopt":
        from memopt.optim import state_bytes

        sb = state_bytes(run.opt)
        out["state_bytes"] = {"total": sb.total, "cache": sb.cache}
        out["state_bytes_agrees"] = sb.total == state and sb.cache == cache
        state, cache = sb.total, sb.cache
    out["state"], out["cache"] = state, cache
    out["check"] = state == f_pers and cache == f_cache
    out["held_check"] = meas["held"] == f_pers + f_cache
    out["step_ms"] = [round(x, 3) for x in ms]
    return out


def mib(b: float) -> str:
    return f"{b / 2**20:.3f}"


def results_table(rows: list[dict[str, Any]]) -> str:
    base = next(r for r in rows if r["impl"] == "torch")
    lines = [
        "| optimizer | steps timed | refreshes | ms/step (mean) | steady ms (median) "
        "| refresh-step ms | time / AdamW | state MiB | cache MiB | held MiB | formula MiB "
        "| state / AdamW | state = formula | held = formula |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for r in rows:
        ref = "-" if r["refresh_mean_ms"] is None else f"{r['refresh_mean_ms']:.1f}"
        form = r["formula"]["persistent"] + r["formula"]["cache"]
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['refreshes']} | {r['mean_ms']:.2f} "
            f"| {r['steady_median_ms']:.2f} | {ref} | {r['mean_ms'] / base['mean_ms']:.2f} "
            f"| {mib(r['state'])} | {mib(r['cache'])} | {mib(r['measured']['held'])} "
            f"| {mib(form)} | {r['state'] / base['state']:.3f} "
            f"| {'PASS' if r['check'] else 'FAIL'} | {'PASS' if r['held_check'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def ratio_rows(rows: list[dict[str, Any]], gap: int,
               costs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    by = {r["name"]: r for r in rows}
    out = []
    for mine, ref, target in TARGETS:
        if mine not in by or ref not in by:
            continue
        a, b = by[mine], by[ref]
        ratio = a["mean_ms"] / b["mean_ms"]
        steady = a["steady_median_ms"] / b["steady_median_ms"]
        refresh = (a["refresh_mean_ms"] / b["refresh_mean_ms"]
                   if a["refresh_mean_ms"] and b["refresh_mean_ms"] else None)
        row = {"memopt": mine, "reference": ref, "target": target, "ratio": ratio,
               "steady_ratio": steady, "refresh_ratio": refresh, "met": ratio <= target}
        if costs and mine in costs and ref in costs:
            row["model_ratio"] = ((a["steady_median_ms"] + costs[mine] / gap)
                                  / (b["steady_median_ms"] + costs[ref] / gap))
        out.append(row)
    return out


def ratio_table(ratios: list[dict[str, Any]]) -> str:
    lines = ["| memopt / reference | target | mean step ratio | steady-step ratio "
             "| refresh-step ratio | steady + refresh/gap ratio | verdict (mean) |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    for q in ratios:
        rr = "-" if q["refresh_ratio"] is None else f"{q['refresh_ratio']:.2f}"
        mr = f"{q['model_ratio']:.2f}" if "model_ratio" in q else "-"
        lines.append(f"| {q['memopt']} / {q['reference']} | <= {q['target']} | {q['ratio']:.2f} "
                     f"| {q['steady_ratio']:.2f} | {rr} | {mr} "
                     f"| {'met' if q['met'] else 'NOT met'} |")
    return "\n".join(lines)


def whole_model_table(size: str, cfg: dict[str, int], gap: int, steps: int) -> str:
    shapes = [s for _, s in block_shapes(cfg["hidden"], cfg["inter"])] * cfg["layers"]
    base = f_adamw(shapes, cfg["rank"], gap, steps)[0]
    lines = [f"Whole LLaMA-{size} ({cfg['layers']} layers, projected matrices only, "
             f"{sum(m * n for m, n in shapes) / 1e6:.1f}M weights), by the formula:", "",
             "| optimizer | state MiB | cache MiB | state / AdamW |", "|---|---:|---:|---:|"]
    for spec in SPECS:
        limit = steps
        pers, cache = spec.formula(shapes, cfg["rank"], gap, limit)
        lines.append(f"| {spec.name} | {mib(pers)} | {mib(cache)} | {pers / base:.3f} |")
    return "\n".join(lines)


# -- where the time goes -------------------------------------------------------------------
CATEGORIES = [  # (category, regex on the op name); the rest is elementwise/other
    ("matmul", r"aten::(mm|addmm_?|bmm|mv|addmv_?|dot)$"),
    ("svd/qr/solve", r"aten::(_?linalg_(svd|qr|solve\w*|eigh|householder_product)|geqrf|orgqr)$"),
    ("randn", r"aten::(normal_|randn|randperm)$"),
]
BREAKDOWN = ["galore-torch GaLore", "memopt GaLore svd", "memopt GaLore rsvd",
             "memopt GaLore rsvd bf16-mm", "apollo-torch APOLLO", "memopt APOLLO",
             "memopt APOLLO bf16-mm"]


def _categorize(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.match(pattern, name):
            return cat
    return "elementwise/other"


def profile_steps(run: Run, pool: list, ts: range) -> dict[str, Any]:
    """Self CPU time per op category and per op, ms per step: the median over steps ``ts``,
    each profiled on its own (medians shrug off a step slowed by other processes)."""
    from torch.profiler import ProfilerActivity, profile

    walls, per_cat, per_op = [], [], []
    for t in ts:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            walls.append(step_with(run, pool[t % len(pool)]) * 1e3)
        cats: dict[str, float] = {}
        ops: dict[str, float] = {}
        for e in prof.key_averages():
            ms = e.self_cpu_time_total / 1e3
            cats[_categorize(e.key)] = cats.get(_categorize(e.key), 0.0) + ms
            ops[e.key] = ms
        per_cat.append(cats)
        per_op.append(ops)

    def med(dicts: list[dict[str, float]]) -> dict[str, float]:
        keys = {k for d in dicts for k in d}
        return {k: statistics.median(d.get(k, 0.0) for d in dicts) for k in keys}

    top = sorted(med(per_op).items(), key=lambda kv: -kv[1])[:5]
    return {"wall_ms": statistics.median(walls), "categories": med(per_cat),
            "top_ops": [(k, round(v, 2)) for k, v in top]}


def breakdown(weights: list, pool: list, rank: int, gap: int) -> list[dict[str, Any]]:
    """Profile step 0 (with its refresh) and steps 3..7 (no refresh) of fresh instances."""
    out = []
    for spec in [s for s in SPECS if s.name in BREAKDOWN]:
        (run,) = build_runs([spec], weights, pool, rank, gap, 0, 0, 2)  # warmed up
        refresh = profile_steps(run, pool, range(0, 1))
        for t in range(1, 3):
            step_with(run, pool[t % len(pool)])
        steady = profile_steps(run, pool, range(3, max(4, min(8, gap))))
        out.append({"name": spec.name, "refresh_step": refresh, "steady_step": steady})
    return out


def _timed(fn: Callable[[], Any]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def refresh_costs(shapes: list, pool: list, rank: int, reps: int) -> dict[str, float]:
    """The subspace refresh alone, ms per block (all 7 matrices), median of ``reps``.

    memopt through its projector API; the references through their projector classes.
    For ``subspace`` the timed refresh is warm-started from a previous basis.
    """
    from apollo_torch.random_projector import GradientProjector
    from galore_torch.galore_projector import GaLoreProjector

    from memopt.optim.projection import make_projector

    def memopt_kind(kind: str, r: int) -> Callable[[], float]:
        proj = make_projector(kind, rank=r, proj_type="std")

        def once() -> float:
            total = 0.0
            for g, g_prev in zip(pool[0], pool[1], strict=True):
                st: dict[str, Any] = {}
                proj.update(st, g_prev, 1)  # the previous basis (used by subspace only)
                total += _timed(partial(proj.update, st, g, 2))
            return total
        return once

    def reference(cls: Any, r: int) -> Callable[[], float]:
        def once() -> float:
            total = 0.0
            for g in pool[0]:
                side = "right" if g.shape[0] >= g.shape[1] else "left"
                if cls is GaLoreProjector:
                    pr = GaLoreProjector(r, proj_type="std")
                    total += _timed(partial(pr.get_orthogonal_matrix, g, r, side))
                else:
                    pr = GradientProjector(r, proj_type="std", seed=1)
                    total += _timed(partial(pr.get_orthogonal_matrix, g, r, side, 1))
            return total
        return once

    cases = {"galore-torch GaLore": reference(GaLoreProjector, rank),
             "memopt GaLore svd": memopt_kind("svd", rank),
             "memopt GaLore rsvd": memopt_kind("rsvd", rank),
             "memopt GaLore subspace": memopt_kind("subspace", rank),
             "apollo-torch APOLLO": reference(GradientProjector, rank),
             "memopt APOLLO": memopt_kind("random", rank),
             "apollo-torch APOLLO-Mini": reference(GradientProjector, 1),
             "memopt APOLLO-Mini": memopt_kind("random", 1)}
    return {name: statistics.median(fn() for _ in range(reps)) for name, fn in cases.items()}


def breakdown_table(items: list[dict[str, Any]]) -> str:
    cats = [c for c, _ in CATEGORIES] + ["elementwise/other"]
    head = " | ".join(f"{c} ms" for c in cats)
    lines = [f"| optimizer | step | wall ms | {head} | top ops (self ms) |",
             "|---|---|---:|" + "---:|" * len(cats) + "---|"]
    for it in items:
        for kind in ("refresh_step", "steady_step"):
            p = it[kind]
            vals = " | ".join(f"{p['categories'].get(c, 0.0):.1f}" for c in cats)
            top = ", ".join(f"{k} {v}" for k, v in p["top_ops"][:3])
            lines.append(f"| {it['name']} | {kind.split('_')[0]} | {p['wall_ms']:.1f} | {vals} "
                         f"| {top} |")
    return "\n".join(lines)


# -- driver --------------------------------------------------------------------------------
def memopt_version() -> str:
    """Where memopt was imported from, with its git commit and whether the tree was dirty."""
    import subprocess

    import memopt

    root = os.path.dirname(os.path.dirname(os.path.abspath(memopt.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "memopt"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return f"{root} @ {head or 'no git'}{' (memopt/ modified)' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None
    return {"cpu": model, "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)"),
            "memopt": memopt_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def bench_one(size: str, gap: int, args: argparse.Namespace, first_gap: bool) -> dict[str, Any]:
    cfg = SIZES[size]
    named = block_shapes(cfg["hidden"], cfg["inter"])
    named = [(f"{n}{b}" if args.blocks > 1 else n, s) for b in range(args.blocks)
             for n, s in named]
    shapes = [s for _, s in named]
    steps = args.steps or 2 * gap
    if steps < 2 * gap:
        print(f"warning: --steps {steps} < 2 * gap ({2 * gap}): not amortized over two "
              "refresh gaps", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)
    weights = [(torch.randn(s, generator=gen) * 0.02).to(DEVICE) for s in shapes]
    pool = make_grad_pool(shapes, args.pool, args.seed + 1)
    checksum = [float(g.abs().sum()) for gs in pool for g in gs]
    specs = [s for s in SPECS if first_gap or s.impl != "bnb"]  # AdamW8bit has no gap
    if args.only:
        specs = [s for s in specs if s.impl == "torch" or any(k in s.name for k in args.only)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    runs = build_runs(specs, weights, pool, cfg["rank"], gap, steps, args.flat_steps, args.warmup)
    done = run_interleaved(runs, pool, steps, args.log_every)
    wall = time.perf_counter() - t0
    for r in runs:
        r.limit = min(r.limit, done)
    assert checksum == [float(g.abs().sum()) for gs in pool for g in gs], "a gradient was mutated"
    rows = [summarize(r, shapes, cfg["rank"], gap) for r in runs]
    costs = None
    if not args.no_breakdown:
        costs = args.refresh_cache.get(size)
        if costs is None:
            costs = args.refresh_cache[size] = refresh_costs(shapes, pool, cfg["rank"],
                                                             args.refresh_reps)
    result = {"size": size, "gap": gap, "rank": cfg["rank"], "steps": done,
              "blocks": args.blocks, "device": str(DEVICE),
              "truncated": done < steps,
              "shapes": named, "rows": rows, "ratios": ratio_rows(rows, gap, costs),
              "refresh_cost_ms": costs, "refresh_reps": args.refresh_reps,
              "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "wall_s": wall}
    if (first_gap and not args.no_breakdown and done == steps
            and not getattr(args, "no_breakdown_profile", False)):
        result["breakdown"] = breakdown(weights, pool, cfg["rank"], gap)
    return result


def report(res: dict[str, Any]) -> str:
    cfg = SIZES[res["size"]]
    shp = ", ".join(f"{n} {m}x{k}" for n, (m, k) in res["shapes"])
    blocks = res.get("blocks", 1)
    what = "one transformer block" if blocks == 1 else f"{blocks} transformer blocks"
    parts = [
        f"### LLaMA-{res['size']}, {what}, rank {res['rank']}, gap {res['gap']}",
        "",
        f"{blocks} block(s) of {cfg['layers']} ({shp if blocks == 1 else shp[:70] + '...'}; "
        f"{sum(m * k for _, (m, k) in res['shapes']) / 1e6:.2f}M weights). Timed steps "
        f"0..{res['steps'] - 1} of a fresh optimizer (refreshes at every multiple of "
        f"{res['gap']}), interleaved; load average {res['loadavg_start']:.2f} -> "
        f"{res['loadavg_end']:.2f}; {res['wall_s']:.0f} s.",
        "", results_table(res["rows"]), "", ratio_table(res["ratios"]),
    ]
    if res["truncated"]:
        parts.insert(2, f"TRUNCATED (interrupted): only {res['steps']} steps timed, fewer than "
                        "the 2 * gap window, so the refresh cost is NOT amortized as intended.\n")
    bad = [r["name"] for r in res["rows"] if not r["finite"]]
    bad += [r["name"] + " (state_bytes != independent count)"
            for r in res["rows"] if r.get("state_bytes_agrees") is False]
    if bad:
        parts += ["", "PROBLEMS: " + "; ".join(bad)]
    if res.get("refresh_cost_ms"):
        parts += ["", "Refresh alone (new subspace for all 7 matrices, median of "
                  f"{res.get('refresh_reps')} repeats), ms: " + ", ".join(
                      f"{k} {v:.1f}" for k, v in res["refresh_cost_ms"].items())]
    if "breakdown" in res:
        parts += ["", "Where the time goes (torch.profiler self CPU time, ms per step; step 0 "
                  "with its refresh, then the median of steps 3-7 profiled one by one). memopt's "
                  "native kernels (the one-pass Adam, channel norms and, on AMX CPUs, the bf16 "
                  "projection GEMMs) are not torch ops: their time shows as the optimizer "
                  "step's own (Optimizer.step#...), not under matmul:", "",
                  breakdown_table(res["breakdown"])]
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="60m,350m", help="comma list of 60m, 350m")
    ap.add_argument("--gaps", "--gap", default="200,50", help="refresh gaps, comma list")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 2 * gap)")
    ap.add_argument("--flat-steps", type=int, default=20,
                    help="timed steps for bnb AdamW8bit (no refresh; slow on CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="steps on a throw-away instance")
    ap.add_argument("--pool", type=int, default=8, help="distinct gradient sets, reused")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma list of name substrings (AdamW always)")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the profiler breakdown and the refresh micro-benchmark")
    ap.add_argument("--refresh-reps", type=int, default=3, help="repeats of the refresh timing")
    ap.add_argument("--log-every", type=int, default=50, help="progress on stderr")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a few steps (smoke)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronize)")
    ap.add_argument("--blocks", type=int, default=1,
                    help="transformer blocks stepped together (e.g. all 24 on a GPU)")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    args = ap.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.refresh_cache = {}
    if args.quick:
        args.sizes, args.gaps, args.flat_steps, args.pool, args.warmup = "tiny", "4", 4, 2, 1
        args.log_every = 0
    return args


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        args.flat_steps = max(args.flat_steps, args.steps or 10**9)  # AdamW8bit is fast there
        args.no_breakdown_profile = True  # the CPU profiler's self time says little on a GPU
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = machine_info()
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ""
    print(f"# Optimizer step time and state bytes\n\nmachine: {info['cpu']}, {info['cpus']} "
          f"CPUs{gpu}, torch {info['torch']} ({info['threads']} threads, OMP_WAIT_POLICY="
          f"{info['omp_wait_policy']}), date {info['date']}\nmemopt: {info['memopt']}\n"
          f"command: python {' '.join(sys.argv)}\n", flush=True)
    results = []
    gaps = [int(g) for g in args.gaps.split(",")]
    for size in args.sizes.split(","):
        for gi, gap in enumerate(gaps):
            res = bench_one(size, gap, args, first_gap=gi == 0)
            results.append(res)
            print(report(res) + "\n", flush=True)
        steps = args.steps or 2 * gaps[0]
        print(whole_model_table(size, SIZES[size], gaps[0], steps) + "\n", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"machine": info, "argv": sys.argv, "results": results}, fh, indent=1)
    failed = [r["name"] for res in results for r in res["rows"] if not r["finite"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
