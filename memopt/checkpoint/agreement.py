"""Ranks that load one snapshot decide together: a refusal on one rank is a refusal on all.

A load can be refused on some ranks only: a rank's shard of the optimizer holds a parameter
the snapshot's state cannot serve (under ``whole_tensor`` one rank may own only 1-D
parameters, which take any Adam state, while another owns the matrices that need projector
state), a rank reads a damaged copy of a file, a rank's tier fails. Had each rank gone its
own way, the others would have loaded (silently diverged ranks) or gone on to their next
collective and waited there for the refusing one.

``agree(group, error, what, tail)`` is called by every rank of the checkpointer's group with
its own outcome (``error``: None when it found nothing wrong). Protocol: one all-reduce of a
per-rank flag (an int32 vector, one slot per rank); only when some rank refused (every rank
sees it in the same vector, so all of them take that branch together) an
``all_gather_object`` of each refusing rank's exception class names and message. A refusing
rank then raises its own exception; every other rank raises one naming the refusing ranks
and quoting them, of the most specific class they all share (``CorruptSnapshotError``,
``SnapshotMismatchError``, ``ValueError``...; else ``RuntimeError``), so ``except`` clauses
catch it on every rank alike. With no group (one process, no process group) it raises
``error`` itself, if any, and issues no collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from memopt.checkpoint.errors import (
    CheckpointError,
    CorruptSnapshotError,
    PeerRecoveryError,
    SnapshotMismatchError,
)

__all__ = ["agree", "refused_ranks"]

#: characters of each refusing rank's message quoted to the others (longer ones are cut)
TEXT_CHARS = 2000
#: classes the other ranks may raise, looked up by name in the refusing ranks' class lists
_CLASSES: dict[str, type[BaseException]] = {
    c.__name__: c
    for c in (
        PeerRecoveryError, CheckpointError, CorruptSnapshotError, SnapshotMismatchError,
        FileNotFoundError, NotImplementedError, TypeError, ValueError, OSError, RuntimeError,
    )
}  # fmt: skip


def refused_ranks(group: Any, refused: bool) -> list[int]:
    """The ranks of ``group`` (group ranks) that passed ``refused=True``; a collective."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world, dtype=torch.int32)
    flags[me] = int(refused)
    dist.all_reduce(flags, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f]


def agree(group: Any, error: BaseException | None, what: str, tail: str) -> None:
    """Return if no rank of ``group`` passed an ``error``; else raise on every rank (see the
    module docstring). ``what`` names the operation ("AsyncCheckpointer.load of step 12 from
    DIR"), ``tail`` says what that means on the other ranks ("nothing was loaded on any
    rank")."""
    if group is None:
        if error is not None:
            raise error
        return
    refused = refused_ranks(group, error is not None)
    if not refused:
        return
    mine = None
    if error is not None:
        mine = ([c.__name__ for c in type(error).__mro__], f"{type(error).__name__}: {error}")
    infos: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(infos, mine, group=group)
    me = dist.get_rank(group)
    if error is not None:
        others = [r for r in refused if r != me]
        add_note = getattr(error, "add_note", None)  # (Python 3.11+)
        if others and add_note is not None:
            add_note(f"{what}: rank(s) {others} refused too; {tail}")
        raise error
    detail = "; ".join(f"rank {r}: {_cut(infos[r][1])}" for r in refused)
    cls = _shared_class([infos[r][0] for r in refused])
    raise cls(f"{what}: refused on rank(s) {refused} of the checkpointer's group "
              f"(this is rank {me}): {detail}; {tail}")  # fmt: skip


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "..."


def _shared_class(mros: list[list[str]]) -> type[BaseException]:
    """The most specific known class in every refusing rank's class list (RuntimeError when
    they share none: a KeyboardInterrupt, say)."""
    for name in mros[0]:
        if name in _CLASSES and all(name in m for m in mros):
            return _CLASSES[name]
    return RuntimeError
