"""What a resume takes from the snapshot and what from the Config (``Setup.resume``).

An optimizer's ``load_state_dict`` restores its param groups along with its state, and
``LambdaLR``'s restores ``base_lrs``: left alone, a run resumed with ``optimizer.lr=1e-5``
would go on at the snapshot's LR while ``Setup.describe()`` printed 1e-05. The Config is what
the run was asked to do, so after the load ``reapply`` puts back what the freshly built
optimizer had from it (``config_values``, taken before the load):

- ``lr`` (the scheduler's ``base_lrs`` and each group's ``initial_lr``), ``betas``, ``eps``,
  ``weight_decay``, and the low-rank ``scale``, ``update_proj_gap`` and ``matmul_dtype``;
- each group's current LR, from the Config's schedule at the snapshot's step: a changed
  ``lr``, ``train.steps`` or warm-up applies from the first resumed step on (with nothing
  changed this is the LR the snapshot holds, to the bit).

It returns one line naming the values that differ from the snapshot's (``Setup.resume_message``
carries it). What shapes the saved state stays the snapshot's, and the line says so when the
Config differs: ``state_dtype`` (the saved moments' dtype), ``rank``, ``density`` and ``proj``
(a rank or density that does not fit the saved state fails the load instead). The moments,
step counters and projectors are the snapshot's, as a resume needs.

``fresh_start_note``: with ``checkpoint.resume`` off, the snapshots an earlier run left in the
directory, which a later resuming run would pick up (the newest step wins).
"""

from __future__ import annotations

from typing import Any

import torch

_REAPPLIED = ("betas", "eps", "weight_decay", "scale", "update_proj_gap", "matmul_dtype")
_KEPT = ("state_dtype", "rank", "density", "proj")


def config_values(optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """The groups' Config-given values and the scheduler's base LRs (call before the load)."""
    keys = (*_REAPPLIED, *_KEPT)
    return {"groups": [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _note(notes: dict[str, list[str]], key: str, text: str) -> None:
    if text not in notes.setdefault(key, []):
        notes[key].append(text)


def reapply(optimizer: torch.optim.Optimizer, scheduler: Any, before: dict[str, Any]) -> str:
    """Put the Config's values (``before``) back after a load; the line of what changed, or ''
    (see the module docstring)."""
    groups = optimizer.param_groups
    changed: dict[str, list[str]] = {}
    kept: dict[str, list[str]] = {}
    for old_base, base in zip(scheduler.base_lrs, before["base_lrs"], strict=True):
        if old_base != base:
            _note(changed, "lr", f"{_fmt(old_base)} -> {_fmt(base)}")
    for fresh, group in zip(before["groups"], groups, strict=True):
        for key, value in fresh.items():
            if group.get(key) == value:
                continue
            if key in _KEPT:
                _note(kept, key, f"{_fmt(group.get(key))} (Config: {_fmt(value)})")
                continue
            _note(changed, key, f"{_fmt(group.get(key))} -> {_fmt(value)}")
            group[key] = value
    scheduler.base_lrs = list(before["base_lrs"])
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:  # LambdaLR (what memopt.setup builds): the LR at the saved step
        for group, base, factor in zip(groups, scheduler.base_lrs, lambdas, strict=True):
            group["initial_lr"] = base
            lr = base * factor(scheduler.last_epoch)  # (LambdaLR.get_lr's arithmetic)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        scheduler._last_lr = [group["lr"] for group in groups]
    parts = []
    if changed:
        parts.append("the Config's optimizer values replace the snapshot's: " + ", ".join(
            f"{k} {' / '.join(v)}" for k, v in changed.items()))
    if kept:
        parts.append("kept from the snapshot (its saved state is built on them): " +
                     ", ".join(f"{k} {' / '.join(v)}" for k, v in kept.items()))
    return "; ".join(parts)


def fresh_start_note(checkpointer: Any, why: str = "checkpoint.resume=false") -> str:
    """With resume off (``why``): what the directory already holds and what it means (or '')."""
    latest = checkpointer.latest()
    if latest is None:
        return ""
    return (f"off ({why}), but {checkpointer.directory} already holds "
            f"snapshots up to step {latest}; this run starts at step 0 and saves next to them, "
            "and a later run with resume on continues from the newest step there, which may "
            "be the earlier run's: use a fresh checkpoint.directory to keep the runs apart")
