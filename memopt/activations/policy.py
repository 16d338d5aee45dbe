"""What to do with a block's saved activations: the ``ActivationPolicy`` axis and the ``Plan``.

A *block* is a named submodule (``model.layers.3``). Its policy says what happens to the
tensors autograd saves during its forward for use in its backward:

- ``keep``: left on the device (what plain PyTorch does).
- ``recompute``: dropped, and the block's forward re-run during backward (activation
  checkpointing). ``keep_ops`` makes it *selective*: outputs of the listed ops (``"aten.mm"``,
  ``"aten._scaled_dot_product_flash_attention"``, ...) are kept, the rest recomputed.
- ``swap``: copied to a storage tier (``tier="cpu"``: the pinned arena; ``"nvme"``) and
  fetched back, with prefetch, before the block's backward.
- ``split`` (MEMO): along the token dimension ``seq_dim``, a fraction ``swap_fraction`` of the
  block's activations is swapped and the rest recomputed.
- ``sample`` (WTA-CRS): ``nn.Linear`` layers inside the block keep only a column-row sample of
  their input (``sample_ratio`` of the rows) for an unbiased weight gradient.

A ``Plan`` is one decision per block plus the planner's predictions; ``apply`` installs either a
``Plan`` or a plain ``{block name: ActivationPolicy}`` mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Action = Literal["keep", "recompute", "swap", "split", "sample"]
Tier = Literal["cpu", "nvme"]
ACTIONS: tuple[Action, ...] = ("keep", "recompute", "swap", "split", "sample")


@dataclass(frozen=True)
class ActivationPolicy:
    """One block's treatment of its saved activations (validated on construction)."""

    action: Action = "keep"
    tier: Tier = "cpu"
    keep_ops: tuple[str, ...] = ()
    swap_fraction: float = 0.5
    seq_dim: int = 1
    sample_ratio: float = 0.3

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"ActivationPolicy.action={self.action!r}; choose one of {ACTIONS}")
        if self.tier not in ("cpu", "nvme"):
            raise ValueError(f"ActivationPolicy.tier={self.tier!r}; choose 'cpu' or 'nvme'")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise ValueError(
                f"ActivationPolicy.swap_fraction={self.swap_fraction}; it must lie in [0, 1]"
            )
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(
                f"ActivationPolicy.sample_ratio={self.sample_ratio}; it must lie in (0, 1]"
            )
        if isinstance(self.seq_dim, bool) or not isinstance(self.seq_dim, int):
            raise TypeError(f"ActivationPolicy.seq_dim={self.seq_dim!r}; it must be an int "
                            "(the token dimension, 1 for (batch, seq, hidden))")  # fmt: skip
        if isinstance(self.keep_ops, str):
            raise TypeError(f"ActivationPolicy.keep_ops is a tuple of op names, e.g. "
                            f"({self.keep_ops!r},), got a string")  # fmt: skip
        if self.keep_ops and self.action != "recompute":
            raise ValueError("ActivationPolicy.keep_ops only applies to action='recompute'")

    def describe(self) -> str:
        """Short label for tables: ``swap(cpu)``, ``recompute[keep aten.mm]``, ``split(0.25)``."""
        if self.action == "swap":
            return f"swap({self.tier})"
        if self.action == "split":
            return f"split({self.swap_fraction:g} swap, {self.tier})"
        if self.action == "sample":
            return f"sample({self.sample_ratio:g})"
        if self.action == "recompute" and self.keep_ops:
            return f"recompute[keep {','.join(self.keep_ops)}]"
        return self.action


def keep() -> ActivationPolicy:
    return ActivationPolicy("keep")


def recompute(keep_ops: tuple[str, ...] = ()) -> ActivationPolicy:
    # (a string passes through: the policy's check names it instead of splitting it)
    ops = keep_ops if isinstance(keep_ops, str) else tuple(keep_ops)
    return ActivationPolicy("recompute", keep_ops=ops)


def swap(tier: Tier = "cpu") -> ActivationPolicy:
    return ActivationPolicy("swap", tier=tier)


def split(swap_fraction: float = 0.5, tier: Tier = "cpu", seq_dim: int = 1) -> ActivationPolicy:
    return ActivationPolicy("split", tier=tier, swap_fraction=swap_fraction, seq_dim=seq_dim)


def sample(ratio: float = 0.3) -> ActivationPolicy:
    return ActivationPolicy("sample", sample_ratio=ratio)


@dataclass(frozen=True)
class BlockDecision:
    """The planner's choice for one block and what it predicts for it.

    held_bytes: device bytes of this block's saved activations held from its forward until its
      backward under ``policy``. transient_bytes: extra device bytes while its backward runs
      (a recomputed block re-materialises its activations). overhead_s: predicted extra step
      time against ``keep`` (recompute time, swap time not hidden by compute, ...).
    ledger_transient_bytes: the part of ``transient_bytes`` a ``SavedLedger`` sees (a swap's or
      split's fetched-back bytes; not a recompute's re-materialisation); None: all of it.
    """

    name: str
    policy: ActivationPolicy
    held_bytes: int
    transient_bytes: int = 0
    overhead_s: float = 0.0
    ledger_transient_bytes: int | None = None

    @property
    def ledger_peak_bytes(self) -> int:
        """This block's predicted peak as its ledger rows see it: held plus, in its own
        backward, what it fetches back (what ``ActivationManager.report`` measures)."""
        seen = self.transient_bytes if self.ledger_transient_bytes is None else (
            self.ledger_transient_bytes)
        return self.held_bytes + seen


@dataclass(frozen=True)
class Plan:
    """Per-block decisions under a byte budget, with the predictions to check after a step."""

    decisions: tuple[BlockDecision, ...]
    budget_bytes: int
    unmanaged_peak_bytes: int
    predicted_peak_bytes: int
    baseline_step_s: float
    predicted_step_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def policies(self) -> dict[str, ActivationPolicy]:
        return {d.name: d.policy for d in self.decisions}

    def table(self) -> str:
        """A fixed-width table: block, policy, held / transient bytes, predicted cost."""
        rows = [("block", "policy", "held MiB", "transient MiB", "overhead ms")]
        for d in self.decisions:
            rows.append((
                d.name, d.policy.describe(), f"{d.held_bytes / 2**20:.2f}",
                f"{d.transient_bytes / 2**20:.2f}", f"{d.overhead_s * 1e3:.2f}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"budget {self.budget_bytes / 2**20:.2f} MiB; predicted peak "
            f"{self.predicted_peak_bytes / 2**20:.2f} MiB (unmanaged "
            f"{self.unmanaged_peak_bytes / 2**20:.2f} MiB); predicted step "
            f"{self.predicted_step_s * 1e3:.1f} ms (unmanaged {self.baseline_step_s * 1e3:.1f} ms)"
        )
        lines += list(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
