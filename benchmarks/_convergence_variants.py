"""Helpers of benchmarks/convergence.py: validation split, 8-bit variants, the plot.

Validation split: held-out *files* that neither the training split nor the reported
held-out (test) split uses. ``examples.tinyllama.byte_corpus`` sends every 10th file of
the sorted standard library to held-out and stops once 0.4 MB is collected; the
validation split is the next held-out-position files after those, so it is disjoint
from both and comes from the same mix of files. Learning rates are chosen on it; the
reported held-out loss never takes part in the choice.

8-bit variants: each trains at its 32-bit counterpart's (chosen) learning rate, with
``state_dtype="int8"`` on memopt optimizers. ``bnb_adamw8bit`` is bitsandbytes'
``AdamW8bit`` with AdamW's learning rate, betas, eps and weight decay (0): the peer for
memopt's ``AdamW(state_dtype="int8")``.

bf16-matmul variants: the projection GEMMs with ``matmul_dtype="bfloat16"``, everything else
as their fp32 counterpart, at its chosen learning rate. ``*_bf16mm`` take the route the
machine gives (on a CPU with torch >= 2.9, oneDNN's bf16 math mode); ``*_bf16cast`` force
GEMMs on bf16 copies (``MEMOPT_MATMUL_ROUTE=cast``, a GPU's rounding). The bar is tighter
than for 8-bit state: within 1% of the counterpart's held-out loss.

Option overrides (``--set NAME:KEY=V[,V...]``): extra values of an optimizer's options
(``examples.tinyllama.default_config``) to run besides its learning rates; every
(option set, rate) pair is a candidate, and the validation loss picks among all of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from examples.tinyllama import LABELS, OPTIMIZERS, default_config, make_optimizer, stdlib_files

# name -> 32-bit counterpart whose learning rate it uses and against which it is compared
EIGHT_BIT: dict[str, str] = {
    "adamw_int8": "adamw",
    "bnb_adamw8bit": "adamw",
    "galore_int8": "galore",
    "apollo_int8": "apollo",
    "frugal_int8": "frugal",
    "natural_galore_int8": "natural_galore",
}
EIGHT_BIT_LABELS = {
    "adamw_int8": "AdamW int8 (memopt)",
    "bnb_adamw8bit": "AdamW8bit (bitsandbytes)",
    "galore_int8": "GaLore int8",
    "apollo_int8": "APOLLO int8",
    "frugal_int8": "FRUGAL int8",
    "natural_galore_int8": "Natural GaLore int8",
}
# name -> fp32-matmul counterpart (same options, same learning rate)
BF16_MM: dict[str, str] = {
    f"{base}_{kind}": base
    for base in ("galore", "apollo", "natural_galore", "frugal")
    for kind in ("bf16mm", "bf16cast")
}
BF16_MM_LABELS = {
    name: f"{LABELS[base]} bf16 matmul" + (" (bf16 copies)" if name.endswith("cast") else "")
    for name, base in BF16_MM.items()
}
COUNTERPART = {**EIGHT_BIT, **BF16_MM}
_MIB = 1024 * 1024
ALL_NAMES = (*OPTIMIZERS, *EIGHT_BIT, *BF16_MM)
ALL_LABELS = {**LABELS, **EIGHT_BIT_LABELS, **BF16_MM_LABELS}
TARGET_BF16MM = 0.01  # bf16 projection GEMMs no more than 1% worse than fp32 ones
TARGET_8BIT = 0.02  # each 8-bit variant no more than 2% worse than its 32-bit counterpart
TARGET_PEER = 0.01  # memopt AdamW int8 within 1% of bitsandbytes' AdamW8bit


def validation_split(max_bytes: int = 400_000, heldout_every: int = 10,
                     test_bytes: int = 400_000) -> torch.Tensor:
    """Bytes (``uint8``) of held-out-position files after those of the test split.

    Mirrors ``byte_corpus(max_bytes=4_000_000)``: files ``i % heldout_every ==
    heldout_every - 1`` go to held-out until ``test_bytes`` are read (the last one
    truncated); the files after that one form this split, up to ``max_bytes``.
    """
    parts: list[bytes] = []
    used = size = 0
    for i, path in enumerate(stdlib_files()):
        if i % heldout_every != heldout_every - 1:
            continue
        try:
            raw = path.read_bytes() + b"\n"
        except OSError:
            continue
        if used < test_bytes:  # a file of the test split
            used += len(raw)
            continue
        raw = raw[: max_bytes - size]
        parts.append(raw)
        size += len(raw)
        if size >= max_bytes:
            break
    if size == 0:
        raise RuntimeError(f"no validation files left under {os.path.dirname(os.__file__)}")
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def build_optimizer(name: str, model: nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a 32-bit one of ``OPTIMIZERS`` or an 8-bit variant); ``kw``
    overrides ``examples.tinyllama.default_config`` (``--set``)."""
    os.environ.pop("MEMOPT_MATMUL_ROUTE", None)  # (set by a bf16-copies variant before)
    if name in OPTIMIZERS:
        return make_optimizer(name, model, lr=lr, **kw)
    if kw and name in ("bnb_adamw8bit", "adamw_int8"):
        raise ValueError(f"--set does not apply to {name!r} (it has no low-rank options): {kw}")
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                   weight_decay=0.0)
    if name == "adamw_int8":
        import memopt

        return memopt.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, state_dtype="int8")
    if name in EIGHT_BIT:
        return make_optimizer(EIGHT_BIT[name], model, lr=lr, state_dtype="int8", **kw)
    if name in BF16_MM:
        if name.endswith("_bf16cast"):
            os.environ["MEMOPT_MATMUL_ROUTE"] = "cast"  # read at every step; reset below
        else:
            os.environ.pop("MEMOPT_MATMUL_ROUTE", None)
        return make_optimizer(BF16_MM[name], model, lr=lr, matmul_dtype="bfloat16", **kw)
    raise ValueError(f"optimizer must be one of {ALL_NAMES}, got {name!r}")


def config_of(name: str, hidden: int, lr: float,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    base = COUNTERPART.get(name, name)
    cfg = {**default_config(base, hidden), **(overrides or {})}
    cfg["lr"] = lr
    if name == "bnb_adamw8bit":
        cfg["impl"] = "bitsandbytes.optim.AdamW8bit"
    elif name in EIGHT_BIT:
        cfg["state_dtype"] = "int8"
    elif name in BF16_MM:
        cfg["matmul_dtype"] = "bfloat16"
        cfg["matmul_route"] = "cast" if name.endswith("_bf16cast") else "auto"
    return cfg


def _value(text: str) -> Any:
    """A ``--set`` value: int, float, true/false, or the string itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_overrides(specs: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``--set NAME:KEY=V[,V...]`` (repeatable) -> per optimizer, the option sets to run:
    the product over its keys of their values (``apollo_mini:scale=128,64`` gives two)."""
    keyed: dict[str, dict[str, list[Any]]] = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        key, _, values = rest.partition("=")
        if name not in ALL_NAMES or not key or not values:
            raise SystemExit(f"--set wants NAME:KEY=V[,V...] with NAME in {ALL_NAMES}, "
                             f"got {spec!r}")
        keyed.setdefault(name, {})[key] = [_value(v) for v in values.split(",")]
    out: dict[str, list[dict[str, Any]]] = {}
    for name, options in keyed.items():
        combos: list[dict[str, Any]] = [{}]
        for key, values in options.items():
            combos = [{**c, key: v} for c in combos for v in values]
        out[name] = combos
    return out


def label_of(name: str, overrides: dict[str, Any]) -> str:
    """The table label: the optimizer's, plus its ``--set`` options if any."""
    if not overrides:
        return ALL_LABELS[name]
    return f"{ALL_LABELS[name]} ({', '.join(f'{k}={v}' for k, v in overrides.items())})"


def eight_bit_table(best: dict[str, dict[str, Any]]) -> str:
    """8-bit variant vs its 32-bit counterpart (target 2%), and memopt vs bnb (target 1%)."""
    mib = 1024 * 1024
    lines = ["| 8-bit optimizer | lr | held-out loss | vs 32-bit | <= 1.02 | state (MiB) | "
             "state vs 32-bit | s/step |", "|---|---|---|---|---|---|---|---|"]
    for name, base_name in EIGHT_BIT.items():
        r, base = best.get(name), best.get(base_name)
        if r is None:
            continue
        if base is None:
            ratio_s = ok = mem_s = "n/a"
        else:
            ratio = r["heldout_loss"] / base["heldout_loss"]
            ratio_s = f"{ratio:.3f} ({LABELS[base_name]})"
            ok = "yes" if ratio <= 1 + TARGET_8BIT else "**no**"  # no more than 2% worse
            mem_s = f"{r['state_bytes'] / base['state_bytes']:.2f}x"
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['heldout_loss']:.4f} | {ratio_s} | "
                     f"{ok} | {r['state_bytes'] / mib:.2f} | {mem_s} | "
                     f"{r['sec_per_step']:.2f} |")
    mine, peer = best.get("adamw_int8"), best.get("bnb_adamw8bit")
    if mine is not None and peer is not None:
        ratio = mine["heldout_loss"] / peer["heldout_loss"]
        ok = "within 1%" if abs(ratio - 1) <= TARGET_PEER else "**not within 1%**"
        lines.append(f"\nmemopt AdamW int8 / bitsandbytes AdamW8bit: {ratio:.4f} ({ok})")
    return "\n".join(lines)


def bf16_matmul_table(best: dict[str, dict[str, Any]]) -> str:
    """bf16 projection GEMMs vs the same optimizer in fp32 (target 1%)."""
    lines = ["| optimizer | lr | held-out loss | vs fp32 matmuls | <= 1.01 | s/step | "
             "s/step vs fp32 |", "|---|---|---|---|---|---|---|"]
    for name, base_name in BF16_MM.items():
        r, base = best.get(name), best.get(base_name)
        if r is None:
            continue
        if base is None:
            ratio_s = ok = speed = "n/a"
        else:
            ratio = r["heldout_loss"] / base["heldout_loss"]
            ratio_s = f"{ratio:.4f}"
            ok = "yes" if ratio <= 1 + TARGET_BF16MM else "**no**"
            speed = f"{r['sec_per_step'] / base['sec_per_step']:.2f}"
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['heldout_loss']:.4f} | {ratio_s} | "
                     f"{ok} | {r['sec_per_step']:.2f} | {speed} |")
    return "\n".join(lines)


def plot(best: dict[str, dict[str, Any]], path: Path, title: str, target: float) -> None:
    """The PNG: training loss (EMA), held-out loss over steps, final loss vs state."""
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
        ax3.scatter([r["state_bytes"] / _MIB], [r["heldout_loss"]], color=color, s=40, zorder=3)
        ax3.annotate(r["label"], (r["state_bytes"] / _MIB, r["heldout_loss"]), fontsize=8,
                     xytext=(5, 4), textcoords="offset points")
    finals = [r["heldout_loss"] for r in best.values()]
    lo = min(min(r["losses"]) for r in best.values())
    ax1.set(title="training loss (EMA 0.9; y axis clipped)", xlabel="step",
            ylabel="nats / byte", ylim=(lo - 0.1, max(finals) + 1.2))
    ax2.set(title="held-out loss (files never trained on)", xlabel="step", ylabel="nats / byte",
            ylim=(min(finals) - 0.1, max(finals) + 1.2))
    max_mib = max(r["state_bytes"] for r in best.values()) / _MIB
    top = max(finals)
    if "adamw" in best:
        limit = best["adamw"]["heldout_loss"] * (1 + target)
        top = max(top, limit)
        ax3.axhline(limit, color="gray", ls="--", lw=1)
        ax3.annotate(f"AdamW + {target:.0%}", (max_mib * 1.22, limit), fontsize=8, color="gray",
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
