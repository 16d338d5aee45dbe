"""Layer 2: memory accounting. Predicts peak bytes per tier before a run (``estimate``) and
records what a run uses (``Timeline``); ``memopt estimate`` / ``memopt report`` are the CLI.
Guide: docs/memory.md.
"""

from memopt.memory.model import ParamInfo, as_meta_module, param_infos
from memopt.memory.optstate import RULES, StateEstimate, optimizer_state

__all__ = [
    "RULES",
    "ParamInfo",
    "StateEstimate",
    "as_meta_module",
    "optimizer_state",
    "param_infos",
]
