"""ZeRO stages 1 and 2 over torch.distributed, with memopt's optimizers plugged in.

``memopt.shard(model, optimizer, stage=..., layout=...)`` (in ``memopt.api``) is the entry
point; this package holds the typed config (``ShardConfig``), the placement plan and buckets
(``plan``), the bucketed collectives (``comm``, ``reduce``), the row-shard projector for
low-rank optimizers (``rowproj``) and the ``ShardedOptimizer``. See docs/shard.md.
"""

from __future__ import annotations

from memopt.sharding.config import LAYOUTS, STAGES, ShardConfig
from memopt.sharding.optimizer import ShardedOptimizer
from memopt.sharding.setup import apply_sharding

__all__ = ["LAYOUTS", "STAGES", "ShardConfig", "ShardedOptimizer", "apply_sharding"]
