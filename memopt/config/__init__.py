"""Layer 4: the typed memopt configuration (``memopt.Config``) and its loaders.

``Config`` holds one frozen, eagerly validated dataclass per section (``OptimizerConfig``,
``ShardingConfig``, ``ActivationsConfig``, ``CheckpointConfig`` and the recipe's ``ModelConfig``,
``DataConfig``, ``TrainConfig``); it loads from YAML with dotted overrides
(``Config.from_yaml(path, overrides=[...])``), from a DeepSpeed JSON config
(``Config.from_deepspeed``), and dumps back to YAML. ``memopt.setup`` (``memopt.config.setup``)
applies it to a model; ``cast_model`` is its ``model.dtype`` cast (parameters and persistent
buffers; non-persistent ones such as RoPE ``inv_freq`` keep their dtype), for ``memopt.shard``
users too. Reference: docs/config.md (generated from these dataclasses).
"""

from memopt.config.cast import cast_model
from memopt.config.config import SECTIONS, Config, apply_override
from memopt.config.sections import (
    PRESETS,
    ActivationsConfig,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ShardingConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS",
    "SECTIONS",
    "ActivationsConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ShardingConfig",
    "TrainConfig",
    "apply_override",
    "cast_model",
]
