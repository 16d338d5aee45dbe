"""Memory-efficient optimizers: GaLore, APOLLO, APOLLO-Mini, FRUGAL, Natural GaLore.

All are ``torch.optim.Optimizer`` subclasses with tensor-only, bit-exactly resumable
state. ``param_groups`` picks low-rank targets by module name; ``state_bytes`` measures
what each parameter's state costs.
"""

from __future__ import annotations

from memopt.optim._base import MemoptOptimizer
from memopt.optim.accounting import StateBytes, state_bytes
from memopt.optim.adamw import AdamW
from memopt.optim.apollo import ApolloAdamW, ApolloMini
from memopt.optim.frugal import FrugalAdamW
from memopt.optim.galore import GaLoreAdamW
from memopt.optim.in_backward import StepInBackward, step_in_backward
from memopt.optim.natural_galore import NaturalGaLoreAdamW
from memopt.optim.param_groups import param_groups
from memopt.optim.projection import PROJECTORS, Projector

__all__ = [
    "PROJECTORS",
    "AdamW",
    "ApolloAdamW",
    "ApolloMini",
    "FrugalAdamW",
    "GaLoreAdamW",
    "MemoptOptimizer",
    "NaturalGaLoreAdamW",
    "Projector",
    "StateBytes",
    "StepInBackward",
    "param_groups",
    "state_bytes",
    "step_in_backward",
]
