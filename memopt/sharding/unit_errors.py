"""What a stage-3 step left done when a tier's I/O failed in it (``FSDPOptimizer``).

``FSDPOptimizer`` steps FSDP2 units one at a time when parameters (``offload_params="nvme"``)
or optimizer state (``offload=``) live on a tier (see ``fsdp_optim``). An ``OSError`` from
that I/O is raised again as an ``OSError`` with the same errno whose message says, as the
stage 1/2 offload optimizers' do: which units were stepped (their parameters hold this
step's values, their step counters have advanced) and which were not; what the failed I/O
left (a failed read changes nothing; a failed state write keeps that state in memory,
``StateStore``; a failed parameter write keeps those shards in memory, ``ParamSwapper``);
and whether the step can be retried (only when nothing was stepped and only a read failed),
is complete (every unit stepped, only a write failed) or must not be retried (reload the
last checkpoint once the cause is fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

from memopt.offload.tier import once_fixed

__all__ = ["UnitProgress", "unit_names"]

_SHOWN = 3  # unit names listed per side


@dataclass
class UnitProgress:
    """Where the unit loop is: ``stepped`` units (a prefix, in unit order) have had their
    inner step; ``io`` names the tier operation running now; ``tail``: the loop is over (only
    the last state writes are waited for); ``params_on_tier``: a parameter tier is in use (a
    unit's updated shards reach it by the write-back after its state is sent; until then, or
    if that write fails, ``ParamSwapper`` keeps them in memory as dirty)."""

    total: int
    params_on_tier: bool = False
    stepped: int = 0
    io: str = "state read"  # "state read" / "state write" / "parameter read" / "parameter write"
    tail: bool = False

    def error(self, err: OSError, names: list[str]) -> OSError:
        """``err`` (same errno) with what this step did; ``names``: each unit's name."""
        base = getattr(err, "tier_error", None) or err  # a ShardIOError: the tier's own
        where = f" ({base.filename})" if base.filename else ""
        when = once_fixed(err)
        unit = getattr(err, "unit", "")
        io = f"{self.io} of {unit}" if unit else self.io
        head = f"{base.strerror or base}{where}; FSDPOptimizer.step (stage 3, {io} failed)"
        n, total = self.stepped, self.total
        if self.io.endswith("read") and n == 0:
            what = (
                " did not complete: no unit was stepped and nothing changed (a failed read "
                "leaves the tier's copy as it was), so the step can be retried "
                f"{when}"
            )
        elif self.io.endswith("write") and n == total:
            what = (
                f": every unit ({total}) was stepped, so this step's update is complete; "
                f"{_KEPT[self.io]}{self._unwritten()}. Do not step again for this batch; give "
                "the tier room or fix it before training on"
            )
        else:
            rest = f"; the other {total - n} ({_listed(names[n:])}) were not" if n < total else ""
            what = (
                f" did not complete: {n} of {total} FSDP2 units were stepped "
                f"({_listed(names[:n])}): their parameters hold this step's values and their "
                f"step counters have advanced{rest}. {_DETAIL[self.io]}{self._unwritten()}. "
                "Do not retry the step (it would step those units again): reload model and "
                f"optimizer from the last checkpoint {when}"
            )
        return OSError(err.errno, head + what)

    def _unwritten(self) -> str:
        if not self.params_on_tier or self.io != "state write" or self.tail:
            return ""
        return (
            "; parameter shards not yet written to their tier (offload_params='nvme') stay "
            "in memory and are written when their unit is next evicted"
        )


_KEPT = {
    "state write": (
        "the state whose write failed was kept in memory (nothing is lost) and is written "
        "again by the next step"
    ),
    "parameter write": (
        "the parameter shards whose write failed were kept in memory (nothing is lost) and "
        "are written again when their unit is next evicted or stepped"
    ),
}
_DETAIL = {
    "state read": "The failed read changed nothing: that state is still on the tier, intact",
    "state write": "State whose write failed was kept in memory (nothing of it is lost)",
    "parameter read": (
        "The failed read changed nothing: those shards are still on the parameter tier, "
        "intact, and are read again when next needed"
    ),
    "parameter write": (
        "Parameter shards whose write failed were kept in memory (nothing of them is lost)"
    ),
}


def unit_names(param_names: list[list[str]]) -> list[str]:
    """A name per unit: the module its parameters share (``blocks.2``), ``root`` for none."""
    out = []
    for names in param_names:
        parts = [n.split(".")[:-1] for n in names] or [[]]
        common = parts[0]
        for p in parts[1:]:
            k = 0
            while k < min(len(common), len(p)) and common[k] == p[k]:
                k += 1
            common = common[:k]
        out.append(".".join(common) or "root")
    return out


def _listed(names: list[str]) -> str:
    if not names:
        return "none"
    more = f", ... {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
