"""Rank 0's commit of a save: the manifest, the atomic rename, rotation.

``commit`` runs after every rank reported its files' checksums and sizes (or its error): when
any rank failed, or a file a rank reported is not in the temporary directory with its size
(the directory was removed and re-created under the save), the temporary directory is
removed and the reason returned; otherwise rank 0 writes
``manifest.json`` (format, step, world size, checksum algorithm, every file's checksum,
versions, user metadata), fsyncs it, renames the directory to ``step_<step>/`` (``publish``)
and rotates old snapshots (steps up to this one; later steps are left alone and recorded in
``job.later_steps`` for the checkpointer's warning). Returns "" on success, else the message
every rank raises.

``settle`` is the collective around it (the writer thread of every rank, once per save, in
save order): the ranks all-gather ``(step, sequence number, report)``, rank 0 commits (or
refuses when the ranks' saves are out of step: a published directory never mixes two saves),
and rank 0 broadcasts the outcome, whatever went wrong in its commit, so no rank waits
forever; a rank whose exchange fails raises ``LostContact``. A rank whose ``save()``
raised an earlier failure instead of saving still takes part with a ``Skipped`` report, so
the ranks keep pairing the same saves.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from memopt._utils import get_logger
from memopt.checkpoint import publish as P
from memopt.checkpoint.config import CheckpointConfig
from memopt.checkpoint.errors import CheckpointError

FORMAT_VERSION = 1
log = get_logger("memopt.checkpoint")


def commit(
    directory: str,
    tmp: str,
    job: Any,
    infos: list[Any],
    config: CheckpointConfig,
    meta: tuple[int, str, dict[str, Any]],
) -> str:
    """Publish ``tmp`` as the snapshot of ``job.step``; ``meta``: world, checksum, metadata."""
    bad = [f"rank {r}: {i}" for r, i in enumerate(infos) if isinstance(i, str)]
    bad += [f"rank {r} did not save it ({i.reason})" for r, i in enumerate(infos)
            if isinstance(i, Skipped)]  # fmt: skip
    if bad:
        P.shutil.rmtree(tmp, ignore_errors=True)
        return f"checkpoint step {job.step} was not published: " + "; ".join(bad)
    try:
        files: dict[str, int] = {}
        for info in infos:
            files.update(info.files)
        if missing := _missing(tmp, infos):  # (never publish what a rank's report promises
            P.shutil.rmtree(tmp, ignore_errors=True)  # but the directory lacks)
            return (f"checkpoint step {job.step} was not published: {tmp} lacks what the ranks "
                    f"wrote: {'; '.join(missing)} (removed by another process?); published "
                    "snapshots are untouched")  # fmt: skip
        P.write_json(os.path.join(tmp, P.MANIFEST), manifest(job.step, files, config, meta),
                     config.fsync)  # fmt: skip
        P.publish(directory, tmp, job.step, config.fsync)
        _, job.later_steps = P.rotate(directory, config.keep, job.step)
    except Exception as e:  # noqa: BLE001 - any failure is the outcome every rank raises
        P.shutil.rmtree(tmp, ignore_errors=True)
        why = str(e) if isinstance(e, OSError) else repr(e)
        return f"checkpoint step {job.step}: publishing {tmp} failed on rank 0: {why}"
    log.info("checkpoint: step %d published (%d ranks)", job.step, meta[0])
    return ""


def _missing(tmp: str, infos: list[Written]) -> list[str]:
    """Rank 0, before the rename: each rank's files as reported (present, same size)."""
    out = []
    for r, info in enumerate(infos):
        for name, size in info.sizes.items():
            try:
                got = os.stat(os.path.join(tmp, name)).st_size
            except FileNotFoundError:
                out.append(f"rank {r}'s {name} is missing")
                continue
            if got != size:
                out.append(f"rank {r}'s {name} holds {got} bytes, {size} were written")
    return out


def manifest(
    step: int, files: dict[str, int], config: CheckpointConfig, meta: tuple[int, str, Any]
) -> dict[str, Any]:
    world, checksum, metadata = meta
    return {
        "format": "memopt-checkpoint",
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world,
        "checksum": checksum,
        "files": files,
        "alignment": config.alignment,
        "versions": {
            "memopt": getattr(sys.modules.get("memopt"), "__version__", "unknown"),
            "torch": torch.__version__,
        },
        "metadata": metadata,
        "time": time.time(),
    }


class LostContact(CheckpointError):
    """``settle``'s exchange failed on this rank: it cannot know whether the others will
    publish the save or remove its temporary directory (``tmpdirs.abandon`` decides)."""


class Written(NamedTuple):
    """A rank's report of a save it wrote: its files' checksums and sizes."""

    files: dict[str, int]
    sizes: dict[str, int]


class Skipped(NamedTuple):
    """A rank's report for a save its ``save()`` did not make (it raised an earlier failure)."""

    reason: str


def report(job: Any) -> Any:
    """This rank's part of a save, for ``settle``: its files' checksums, or why it has none."""
    if job.error is None:
        return Written(job.files, job.sizes)
    return Skipped(job.skipped) if job.skipped else repr(job.error)


def settle(
    job: Any, rank: int, world: int, group: Any, commit_fn: Callable[[list[Any]], str],
    tmp_of: Callable[[int, int], str],
) -> tuple[str, bool]:  # fmt: skip
    """The collective publication of ``job`` (see the module docstring): returns the outcome
    ("" when published) and whether the save failed only because ranks skipped it."""
    mine = (job.step, job.seq, report(job))
    rows: list[Any] = [mine]
    try:
        if group is not None:
            rows = [None] * world
            dist.all_gather_object(rows, mine, group=group)
        outcome = _decide(rows, job, commit_fn, tmp_of) if rank == 0 else ""
        if group is not None:
            box = [outcome]
            dist.broadcast_object_list(box, group=group, group_src=0)
            outcome = box[0]
    except Exception as e:
        raise LostContact(
            f"checkpoint step {job.step}: rank {rank} lost contact with the other ranks while "
            f"publishing it (did a rank die, or its process group end?): {e!r}"
        ) from e
    infos = [r[2] for r in rows]
    only_skipped = len({r[:2] for r in rows}) == 1 and any(isinstance(i, Skipped) for i in infos)
    only_skipped = only_skipped and not any(isinstance(i, str) for i in infos)
    return outcome, bool(outcome) and only_skipped


def _decide(
    rows: list[Any], job: Any, commit_fn: Callable[[list[Any]], str],
    tmp_of: Callable[[int, int], str],
) -> str:  # fmt: skip
    """Rank 0: commit ``job`` when every rank reported the same save, else refuse; never
    raises (the other ranks wait for the broadcast of what it returns)."""
    keys = [(r[0], r[1]) for r in rows]
    try:
        if len(set(keys)) > 1:
            for step, seq in set(keys):
                P.shutil.rmtree(tmp_of(step, seq), ignore_errors=True)
            seen = ", ".join(f"rank {r}: step {s} (save #{q})" for r, (s, q) in enumerate(keys))
            return (
                f"checkpoint step {job.step} was not published: the ranks' saves are out of step "
                f"({seen}); every rank must call save() for the same steps in the same order"
            )
        return commit_fn([r[2] for r in rows])
    except Exception as e:  # noqa: BLE001 - turned into the outcome every rank raises
        P.shutil.rmtree(tmp_of(job.step, job.seq), ignore_errors=True)
        return f"checkpoint step {job.step} was not published: rank 0's commit failed: {e!r}"


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``AsyncCheckpointer(metadata=...)``, checked once: it goes into every manifest (JSON)."""
    if not isinstance(metadata, Mapping):
        raise ValueError(
            f"AsyncCheckpointer: metadata must be a dict, got {type(metadata).__name__}"
        )
    out = dict(metadata)
    for key, value in out.items():
        try:
            json.dumps({key: value}, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"AsyncCheckpointer: metadata[{key!r}] = {value!r} ({type(value).__name__}) "
                f"cannot be stored: metadata goes into manifest.json and must be JSON "
                f"(str keys; str, int, float, bool, None, lists and dicts of them; e.g. "
                f"float(x) for a numpy number): {e}"
            ) from e
    return out
