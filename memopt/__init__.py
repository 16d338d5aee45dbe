"""memopt: train PyTorch models that do not fit, or train slowly, because of memory.

The stable public surface is what this module and each subpackage's ``__all__`` export.
"""

from __future__ import annotations

from memopt import activations, checkpoint, memory, optim, sharding
from memopt.api import Setup, setup, shard
from memopt.config import Config

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Setup",
    "activations",
    "checkpoint",
    "memory",
    "optim",
    "setup",
    "shard",
    "sharding",
    "__version__",
]
