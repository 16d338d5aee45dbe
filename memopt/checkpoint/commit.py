"""Rank 0's commit of a save: the manifest, the atomic rename, rotation.

``commit`` runs after every rank reported its files' checksums (or its error): when any rank
failed, the temporary directory is removed and the reason returned; otherwise rank 0 writes
``manifest.json`` (format, step, world size, checksum algorithm, every file's checksum,
versions, user metadata), fsyncs it, renames the directory to ``step_<step>/`` (``publish``)
and rotates old snapshots (steps up to this one; later steps are left alone and recorded in
``job.later_steps`` for the checkpointer's warning). Returns "" on success, else the message
every rank raises.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from memopt._utils import get_logger
from memopt.checkpoint import publish as P
from memopt.checkpoint.config import CheckpointConfig

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
    if bad:
        P.shutil.rmtree(tmp, ignore_errors=True)
        return f"checkpoint step {job.step} was not published: " + "; ".join(bad)
    try:
        files: dict[str, int] = {}
        for info in infos:
            files.update(info)
        P.write_json(os.path.join(tmp, P.MANIFEST), manifest(job.step, files, config, meta),
                     config.fsync)  # fmt: skip
        P.publish(directory, tmp, job.step, config.fsync)
        _, job.later_steps = P.rotate(directory, config.keep, job.step)
    except OSError as e:
        P.shutil.rmtree(tmp, ignore_errors=True)
        return f"checkpoint step {job.step}: publishing {tmp} failed: {e}"
    log.info("checkpoint: step %d published (%d ranks)", job.step, meta[0])
    return ""


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
