"""The ``memopt report`` outputs of a ``Timeline``: a PNG plot and a markdown table.

The plot draws one curve per tier that holds anything (host RSS, device, pinned, disk),
vertical lines at the marks (step boundaries), and, when an estimate is given, its predicted
peak as a dashed horizontal line per tier in the same colour. The table lists, per mark, the
bytes of each tier at that moment, then the measured peak next to the prediction and their
ratio. matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memopt.memory.result import fmt_bytes

COLORS = {"host": "tab:blue", "device": "tab:red", "pinned": "tab:green", "disk": "tab:purple"}


def predicted(timeline: Any, estimate: Any) -> dict[str, int]:
    """The estimate's peak mapped onto the timeline's tiers (a CPU run's device is host).

    With an arena watched, pinned bytes are compared with the arena's report and left out of
    the host figure: the arena maps its chunks ahead (256 MiB pieces, typically already at the
    warm-up), so state placed in them does not show as RSS growth.
    """
    if estimate is None:
        return {}
    p = estimate.peak
    host = p["pinned_host"] + p["pageable_host"]
    if timeline.arena is not None:
        host -= p["pinned_host"]
    if timeline.cuda:
        return {"device": p["device"], "host": host, "pinned": p["pinned_host"], "disk": p["disk"]}
    return {"host": host + p["device"], "pinned": p["pinned_host"], "disk": p["disk"]}


def markdown(timeline: Any, estimate: Any = None) -> str:
    tiers = [t for t in COLORS if any(getattr(s, t) for s in timeline.samples) or t == "host"]
    lines = ["| mark | t (s) | " + " | ".join(tiers) + " |", "|---|---:|" + "---:|" * len(tiers)]
    by_t = {s.t: s for s in timeline.samples}
    for t, label in timeline.marks:
        s = by_t.get(t)
        if s is not None:
            cells = " | ".join(fmt_bytes(getattr(s, k)) for k in tiers)
            lines.append(f"| {label} | {t:.3f} | {cells} |")
    peak, pred = timeline.peak(), predicted(timeline, estimate)
    lines += [
        "",
        "| tier | measured peak | predicted peak | predicted / measured |",
        "|---|---:|---:|---:|",
    ]
    for k in tiers:
        if k in pred:
            ratio = f"{pred[k] / peak[k]:.3f}" if peak[k] else "-"
            lines.append(f"| {k} | {fmt_bytes(peak[k])} | {fmt_bytes(pred[k])} | {ratio} |")
        else:
            lines.append(f"| {k} | {fmt_bytes(peak[k])} | - | - |")
    return "\n".join(lines) + "\n"


def plot(
    timeline: Any, path: Path, estimate: Any = None, title: str = "memopt memory timeline"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ts = [s.t for s in timeline.samples]
    pred = predicted(timeline, estimate)
    for tier, color in COLORS.items():
        ys = [getattr(s, tier) / 2**20 for s in timeline.samples]
        if any(ys) or tier == "host":
            ax.plot(ts, ys, color=color, label=f"{tier} (measured)")
            if pred.get(tier):
                ax.axhline(
                    pred[tier] / 2**20, color=color, ls="--", label=f"{tier} (predicted peak)"
                )
    for t, label in timeline.marks:
        ax.axvline(t, color="0.7", lw=0.8)
        ax.text(t, ax.get_ylim()[1], label, rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB above baseline")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(timeline: Any, directory: Path, estimate: Any = None) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    png, md = directory / "timeline.png", directory / "timeline.md"
    plot(timeline, png, estimate)
    text = markdown(timeline, estimate)
    if estimate is not None:
        text += "\n## Estimate\n\n" + str(estimate) + "\n"
    md.write_text(text)
    return {"png": png, "md": md}
