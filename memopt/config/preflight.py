"""Checks of a ``Config`` against the run it will be: the world size, and the directories it
writes.

``memopt.setup`` learns the world size only once the ranks are up, so a recipe that cannot run
on that many ranks (or cannot write where it is told to) used to fail in every rank at once,
each with its traceback under torchrun's report. Whoever knows the world size earlier (``memopt
run``: ``--nproc-per-node`` times ``--nnodes``) calls these before starting a process, and
``memopt.setup`` calls the same functions on every rank before it builds anything, so each rule
lives here once.

- ``check_world(config, world)``: in-memory checkpoint redundancy needs 2+ ranks, a checkpoint
  directory, and a group its copies / erasure stripe fit (``RedundancyConfig.group_size_error``,
  which the peer tier applies too); optimizer-in-backward runs on one rank only.
- ``check_paths(config)``: creates the checkpoint directory (``AsyncCheckpointer``'s own check)
  and the NVMe swap directories (``sharding.nvme_path``, ``activations.nvme_path``) the config
  will use; a ``ValueError`` naming the key when one cannot be created or written.
- ``redundancy_config(checkpoint, world)``: those keys as the checkpointer's
  ``RedundancyConfig`` (``memopt.setup`` builds its checkpointer with it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memopt.config.config import Config
from memopt.config.sections import CheckpointConfig


def check_world(config: Config, world: int) -> None:
    """``ValueError`` naming the key when ``config`` cannot run on ``world`` ranks."""
    ck = config.checkpoint
    if ck.redundancy != "none" and world < 2:
        raise ValueError(f"checkpoint.redundancy: {ck.redundancy} needs 2+ ranks "
                         "(torchrun --nproc-per-node 2); set it to none on one process")
    if ck.redundancy != "none" and not ck.directory:
        raise ValueError("checkpoint.redundancy is a tier of the checkpointer: set "
                         "checkpoint.directory too")
    if config.optimizer.in_backward and world > 1:
        raise ValueError(
            "optimizer.in_backward: each rank would update its parameters from its local "
            "gradient during backward, before DDP's all-reduce, and the ranks would drift "
            f"apart ({world} ranks here); use it on one process (or turn it off for multi-rank "
            "runs)"
        )
    if ck.redundancy != "none":
        keys = "copies" if ck.redundancy == "replicate" else "erasure_k/erasure_m"
        try:
            problem = redundancy_config(ck, world).group_size_error(world)
        except ValueError as e:  # (erasure_k 0 with erasure_m >= world: k = world - m < 1)
            if str(e).startswith("checkpoint."):
                raise
            raise ValueError(f"checkpoint.{keys} on {world} ranks: {e}") from None
        if problem:
            raise ValueError(f"checkpoint.{keys}: {problem}")


def redundancy_config(ck: CheckpointConfig, world: int) -> Any:
    """``checkpoint.redundancy/copies/erasure_k/erasure_m`` as a ``RedundancyConfig`` (or None)."""
    if ck.redundancy == "none":
        return None
    # (imported here: memopt.checkpoint loads torch, which the launcher's checks need not)
    from memopt.checkpoint.redundancy_config import RedundancyConfig

    if ck.redundancy == "replicate":
        return RedundancyConfig(mode="replicate", copies=ck.copies)
    k = ck.erasure_k or world - ck.erasure_m
    config = RedundancyConfig(mode="erasure", k=k, m=ck.erasure_m)
    problem = config.group_size_error(world)
    if problem:
        raise ValueError(f"checkpoint.erasure_k/erasure_m: {problem}")
    return config


def check_paths(config: Config) -> None:
    """Create the directories the run writes; ``ValueError`` naming the key when one cannot be
    created or is not writable (see the module docstring)."""
    if config.checkpoint.directory:
        from memopt.checkpoint.publish import check_directory  # the checkpointer's own rule

        try:
            check_directory(os.path.abspath(config.checkpoint.directory))
        except OSError as e:
            why = str(e).removeprefix("AsyncCheckpointer: ")
            raise ValueError(f"checkpoint.directory: {why}") from None
    sc, ac = config.sharding, config.activations
    if sc.nvme_path and "nvme" in (sc.offload, sc.offload_params):
        swap_directory("sharding.nvme_path", sc.nvme_path)
    if ac.nvme_path and ac.enabled and ac.tier == "nvme":
        swap_directory("activations.nvme_path", ac.nvme_path)


def swap_directory(key: str, path: str) -> None:
    """Create the NVMe swap directory ``path`` (config key ``key``) if missing; ``ValueError``
    naming the key when that fails or the directory is not writable."""
    where = Path(path)
    if where.exists() and not where.is_dir():
        raise ValueError(f"{key}: {path} is an existing file, not a directory; the NVMe tier "
                         "keeps its swap files in a directory (created when missing)")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{key}: cannot create the NVMe swap directory {path} ({e}); pass a "
                         "directory on a filesystem this process can write") from None
    if not os.access(where, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: the NVMe swap directory {path} is not writable by this "
                         "process; pass a directory you can write to")
