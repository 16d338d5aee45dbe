"""Ranks fail together: ``agree(comm, error)`` raises on every rank if any rank failed.

A check or a setup step that can fail on some ranks only (an optimizer with state on one
rank, an NVMe tier directory that is read-only or full on one node) must make every rank
raise: otherwise the healthy ranks go on into their first collective and wait there for the
failed one, until the group's timeout (30 minutes by default) if its process stays alive (a
notebook, a retry loop, a rank writing a crash report).

Protocol: one all-reduce of a flag per rank (``Comm.flagged_ranks``). Only when some rank
failed (every rank then knows it, so all of them take this branch), a second all-reduce
carries each failed rank's error text (``type: message``, its first ``TEXT_BYTES`` bytes of
UTF-8, one row per rank), so the healthy ranks raise naming the failed ranks and what went
wrong there (the directory and errno of a tier, the parameter of a check); each failed rank
raises its own exception. The healthy ranks raise ``ValueError`` when every failure was a
``ValueError`` / ``TypeError`` (bad input), else ``RuntimeError``.
"""

from __future__ import annotations

import torch

from memopt.sharding.comm import Comm

__all__ = ["TEXT_BYTES", "agree"]

#: bytes of each failed rank's error text sent to the others (longer ones are cut)
TEXT_BYTES = 768
_INPUT_ERRORS = ("ValueError", "TypeError")


def agree(
    comm: Comm,
    error: BaseException | None,
    what: str,
    device: torch.device | None = None,
) -> None:
    """Raise on every rank if any rank passed an ``error`` (``what`` says what failed, e.g.
    "failed their input checks; no collective was issued"); return if none did."""
    if comm.world > 1:
        failed = comm.flagged_ranks(error is not None, device=device)
        if failed:
            texts = _exchange(comm, failed, error, device)
            if error is None:
                kinds = {text.split(":", 1)[0] for text in texts.values()}
                cls = ValueError if kinds <= set(_INPUT_ERRORS) else RuntimeError
                detail = "; ".join(f"rank {r}: {texts[r]}" for r in failed)
                raise cls(f"memopt.shard: rank(s) {failed} {what}: {detail}")
    if error is not None:
        raise error


def _exchange(
    comm: Comm, failed: list[int], error: BaseException | None, device: torch.device | None
) -> dict[int, str]:
    """Each failed rank's ``type: message`` (cut at ``TEXT_BYTES`` bytes), by rank."""
    rows = torch.zeros(comm.world, TEXT_BYTES, dtype=torch.int32, device=device or comm.device())
    if error is not None:
        raw = f"{type(error).__name__}: {error}".encode()[:TEXT_BYTES]
        rows[comm.rank, : len(raw)] = torch.tensor(list(raw), dtype=torch.int32)
    comm.all_reduce_sum(rows, what="the error texts of the ranks that failed")
    table = rows.cpu().tolist()
    return {r: bytes(b for b in table[r] if b).decode(errors="replace") for r in failed}
