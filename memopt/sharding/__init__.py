"""ZeRO stages 1, 2 and 3 (on FSDP2) over torch.distributed, with memopt's optimizers plugged in.

``memopt.shard(model, optimizer, stage=..., layout=...)`` (in ``memopt.api``) is the entry
point; this package holds the typed config (``ShardConfig``), the placement plan and buckets
(``plan``), the bucketed collectives (``comm``, ``reduce``), the row-shard projector for
low-rank optimizers (``rowproj``) and the ``ShardedOptimizer``; stage 3 applies FSDP2's
``fully_shard`` (``fsdp``) and steps the DTensor row shards (``fsdp_optim``). See docs/shard.md.
"""

from __future__ import annotations

from memopt._utils.dist_teardown import shutdown_distributed
from memopt.sharding.config import LAYOUTS, STAGES, ShardConfig
from memopt.sharding.fsdp import FSDPOptions
from memopt.sharding.fsdp_optim import FSDPOptimizer
from memopt.sharding.optimizer import ShardedOptimizer
from memopt.sharding.setup import apply_sharding

__all__ = [
    "LAYOUTS",
    "STAGES",
    "FSDPOptimizer",
    "FSDPOptions",
    "ShardConfig",
    "ShardedOptimizer",
    "apply_sharding",
    "shutdown_distributed",
]
