"""What a stage-3 step left done when a tier's I/O failed in it (``FSDPOptimizer``).

``FSDPOptimizer`` steps FSDP2 units one at a time when parameters (``offload_params="nvme"``)
or optimizer state (``offload=``) live on a tier (see ``fsdp_optim``). An ``OSError`` from
that I/O is raised again as an ``OSError`` with the same errno whose message says, as the
stage 1/2 offload optimizers' do: which units were stepped (their parameters hold this
step's values, their step counters have advanced) and which were not; what the failed I/O
left (a failed state read changes nothing; a failed state write keeps that state in memory,
``StateStore``); and whether the step can be retried (only when nothing was stepped and only
a state read failed) or must not be (reload the last checkpoint once the cause is fixed).
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
    unit's updated shards reach it only by the write-back after its state is sent)."""

    total: int
    params_on_tier: bool = False
    stepped: int = 0
    io: str = "state read"  # "state read" / "state write" / "parameter read" / "parameter write"
    tail: bool = False

    def error(self, err: OSError, names: list[str]) -> OSError:
        """``err`` (same errno) with what this step did; ``names``: each unit's name."""
        where = f" ({err.filename})" if err.filename else ""
        when = once_fixed(err)
        head = f"{err.strerror or err}{where}; FSDPOptimizer.step (stage 3, {self.io} failed)"
        n, total = self.stepped, self.total
        if self.io == "state read" and n == 0:
            what = (
                " did not complete: no unit was stepped and nothing changed (a failed state "
                "read leaves the state on the tier as it was), so the step can be retried "
                f"{when}"
            )
        elif self.io == "state write" and n == total and (self.tail or not self.params_on_tier):
            what = (
                f": every unit ({total}) was stepped, so this step's update is complete; the "
                "state whose write failed was kept in memory (nothing is lost) and is written "
                "again by the next step. Do not step again for this batch; give the tier room "
                "or fix it before training on"
            )
        else:
            rest = f"; the other {total - n} ({_listed(names[n:])}) were not" if n < total else ""
            what = (
                f" did not complete: {n} of {total} FSDP2 units were stepped "
                f"({_listed(names[:n])}): their parameters hold this step's values and their "
                f"step counters have advanced{rest}. {_DETAIL[self.io]} Do not retry the step "
                f"(it would step those units again): reload model and optimizer from the last "
                f"checkpoint {when}"
            )
        return OSError(err.errno, head + what)


_PARAMS = (
    "The parameter tier (offload_params='nvme') failed: build the model and optimizer again "
    "(memopt.shard) before loading the checkpoint."
)
_DETAIL = {
    "state read": "The failed read changed nothing: that state is still on the tier, intact.",
    "state write": "State whose write failed was kept in memory (nothing of it is lost).",
    "parameter read": _PARAMS,
    "parameter write": _PARAMS,
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
