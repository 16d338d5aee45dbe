"""Master weights in the estimate, as ``memopt.sharding`` keeps them (layer 2 may not import
it; its rule is ``memopt/sharding/masters.py``, its stage-3 casts ``fsdp_dtypes.py``):

- a master copy exists when ``master_dtype`` is wider than ``param_dtype``; the same dtype is
  no master; a narrower one or one of the same width in another format (bf16 masters of
  fp16 parameters, fp16 of bf16) is refused by ``EstimateConfig``, as ``memopt.shard``
  refuses it at every stage;
- stages 1/2, and stage 3 on one rank without parameter offload (the plain path): a copy of
  this rank's part beside the parameters (``master_bytes``);
- stage 3 under FSDP2 (several ranks, or ``offload_params``, which is FSDP2's on one rank
  too): the trainable shards are cast to the master dtype before sharding, so they *are* the
  masters; frozen parameters (which the optimizer does not hold) keep ``param_dtype``
  (``estimate.assemble``). Before, the estimate replaced every parameter's bytes by the
  masters' and so dropped the frozen shards (a LLaMA with half its layers frozen: 242 KiB
  predicted for the 330 KiB two gloo ranks hold).
"""

from __future__ import annotations

from typing import Any

__all__ = ["fsdp2", "master_bytes"]


def fsdp2(cfg: Any) -> bool:
    """Whether stage 3 runs FSDP2 (several ranks, or parameter offload); one rank without it
    runs the plain path, whose masters are copies beside the parameters."""
    return bool(cfg.stage == 3 and (cfg.world_size > 1 or cfg.offload_params is not None))


def master_bytes(cfg: Any, numel: int) -> int:
    """Bytes of the master copies of ``numel`` owned elements (0: no masters)."""
    if cfg.master_dtype is None or cfg.master_dtype == cfg.param_dtype:
        return 0
    return int(numel * cfg.master_dtype.itemsize)
