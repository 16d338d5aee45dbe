"""Layer 2: memory accounting. Predicts peak bytes per tier before a run (``estimate``) and
records what a run uses (``Timeline``); ``memopt estimate`` / ``memopt report`` are the CLI.
Guide: docs/memory.md.
"""

from memopt.memory.estimate import EstimateConfig, estimate
from memopt.memory.model import ParamInfo, as_meta_module, param_infos
from memopt.memory.optstate import RULES, StateEstimate, optimizer_state
from memopt.memory.result import MemoryEstimate, fmt_bytes
from memopt.memory.timeline import Timeline, mmap_large_allocations
from memopt.memory.trace import ActivationTrace, trace_step

__all__ = [
    "RULES",
    "ActivationTrace",
    "EstimateConfig",
    "MemoryEstimate",
    "ParamInfo",
    "StateEstimate",
    "Timeline",
    "as_meta_module",
    "estimate",
    "fmt_bytes",
    "mmap_large_allocations",
    "optimizer_state",
    "param_infos",
    "trace_step",
]
