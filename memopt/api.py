"""The one-call entry points: ``memopt.shard``.

``shard`` builds the typed ``ShardConfig`` (validated before anything else happens) and hands
it to ``memopt.sharding.apply_sharding``, which checks the model, optimizer and process group
before any collective is issued.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.sharding import ShardConfig, ShardedOptimizer, apply_sharding
from memopt.sharding.config import DEFAULT_BUCKET_BYTES, Layout, Stage
from memopt.sharding.fsdp import FSDPOptions


def shard(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: Stage = 2,
    layout: Layout | None = None,
    *,
    process_group: Any = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    master_dtype: torch.dtype | None = None,
    fsdp: FSDPOptions | None = None,
) -> tuple[nn.Module, ShardedOptimizer]:
    """Partition ``optimizer``'s state (stage 1), gradients (2) and parameters (3) over the ranks.

    Call it on every rank after ``torch.distributed.init_process_group`` (or with no process
    group at all: world size 1 runs the plain single-process arithmetic), after building the
    optimizer and before its first step. Returns the model (unchanged object; stage 2 adds
    post-accumulate-grad hooks to its parameters) and a ``ShardedOptimizer`` to use in place
    of ``optimizer`` from now on. ``layout`` defaults to ``"whole_tensor"`` (``"dim0"`` for
    stage 3). Stage 3 shards the model in place with FSDP2's ``fully_shard`` (options:
    ``fsdp=memopt.sharding.FSDPOptions(...)``) and returns an ``FSDPOptimizer``. See
    docs/shard.md.
    """
    if layout is None:
        layout = "dim0" if stage == 3 else "whole_tensor"
    config = ShardConfig(
        stage=stage, layout=layout, bucket_bytes=bucket_bytes, master_dtype=master_dtype
    )
    return apply_sharding(model, optimizer, config, process_group, fsdp)


__all__ = ["shard"]
