"""How failed saves reach the caller of ``AsyncCheckpointer.save``/``wait``/``close``.

A save that failed in the background is raised once, by the first of those calls that finds
it finished. ``save(k)`` that finds one raises it *instead of* saving: step k is not saved,
and the message says so (call ``save`` again to save). On 2+ ranks that ``save(k)`` still
hands the writer a job marked skipped (``Job.skipped``): every rank's writer then pairs the
same saves in the collective publication (``commit.settle``), whichever rank noticed the
failure first. The other ranks see step k fail "because rank r did not save it"
(``Job.by_peer``): ``save()`` warns about such a step instead of raising it (raising would
make those ranks skip the next save, which would fail on the first rank, and so on), and
``wait()``/``close()`` raise it like any failure. A failure from outside the file write (a
peer that died in the middle of the exchange, an error in the copy) names the step and rank.
"""

from __future__ import annotations

import warnings
from typing import Any

from memopt.checkpoint.errors import CheckpointError

SKIPPED = "its save() raised an earlier failure there instead of saving"


def describe(job: Any, rank: int) -> str:
    """The message of ``job``'s failure, naming its step and this rank."""
    err = job.error
    if isinstance(err, CheckpointError):
        return str(err)
    return f"checkpoint step {job.step} failed on rank {rank}: {err!r}"


def pending(
    failed: list[Any], lost: list[Any], in_save: bool, rank: int, peers: Any
) -> tuple[str, BaseException | None] | None:
    """The failure to raise now, as (message, cause), or None: the first failed save (else a
    failure of the peers' tier), the others appended. ``lost``: saves that failed only
    because other ranks skipped them; warned about from ``save()`` (``in_save``) when there
    is nothing else to raise, raised in order with the others from ``wait()``/``close()``."""
    if not in_save:
        failed, lost = sorted(failed + lost, key=lambda j: j.seq), []
    found: list[tuple[str, BaseException | None]] = [(describe(j, rank), j.error) for j in failed]
    if not found and peers is not None:
        try:
            peers.raise_pending()
        except CheckpointError as e:
            found.append((str(e), e))
    if not found:
        if lost:
            warnings.warn("; ".join(describe(j, rank) for j in lost), stacklevel=4)
        return None
    return combine(found + [(describe(j, rank), j.error) for j in lost])


def combine(found: list[tuple[str, BaseException | None]]) -> tuple[str, BaseException | None]:
    """The first failure's message, with the others appended: (message, cause)."""
    text, cause = found[0]
    if len(found) > 1:
        text += " (also: " + "; ".join(t for t, _ in found[1:]) + ")"
    return text, cause


def not_saved(step: int, text: str) -> str:
    """The message of ``save(step)`` raising an earlier failure instead of saving."""
    return (
        f"checkpoint step {step} was NOT saved, because an earlier save failed: {text} (save() "
        f"raises such a failure instead of saving; call save() again to save step {step})"
    )


def as_error(text: str, cause: BaseException | None) -> CheckpointError:
    """``cause`` itself when it is the CheckpointError of ``text``, else a new one from it."""
    if isinstance(cause, CheckpointError) and str(cause) == text:
        return cause
    err = CheckpointError(text)
    err.__cause__ = cause
    return err
