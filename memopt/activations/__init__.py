"""Activation memory: swap saved activations to a tier, recompute, sample, under a byte budget.

``ActivationPolicy`` (``policy.py``) names what happens to one block's saved activations;
``SavedLedger`` (``ledger.py``) counts the bytes held per place. The managers and the
planner build on these two.
"""

from memopt.activations.apply import ActivationManager, apply
from memopt.activations.install import ActivationOptions
from memopt.activations.ledger import SavedLedger
from memopt.activations.policy import ActivationPolicy, BlockDecision, Plan

__all__ = [
    "ActivationManager",
    "ActivationOptions",
    "ActivationPolicy",
    "BlockDecision",
    "Plan",
    "SavedLedger",
    "apply",
]
