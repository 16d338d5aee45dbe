"""Activation memory: swap saved activations to a tier, recompute, sample, under a byte budget.

``ActivationPolicy`` (``policy.py``) names what happens to one block's saved activations;
``SavedLedger`` (``ledger.py``) counts the bytes held per place. The managers and the
planner build on these two. ``profile`` measures a step per block, ``plan`` picks a policy per
block under a byte budget, ``measure_step`` + ``compare`` check a plan after a step.
"""

from memopt.activations.apply import ActivationManager, apply
from memopt.activations.blocks import find_blocks
from memopt.activations.install import ActivationOptions
from memopt.activations.ledger import SavedLedger
from memopt.activations.measure import StepMeasure, measure_step
from memopt.activations.planner import BudgetPlan, compare, plan, plan_from_profile
from memopt.activations.policy import ActivationPolicy, BlockDecision, Plan
from memopt.activations.profile import BlockProfile, Profile, profile

__all__ = [
    "ActivationManager",
    "ActivationOptions",
    "ActivationPolicy",
    "BlockDecision",
    "BlockProfile",
    "BudgetPlan",
    "Plan",
    "Profile",
    "SavedLedger",
    "StepMeasure",
    "apply",
    "compare",
    "find_blocks",
    "measure_step",
    "plan",
    "plan_from_profile",
    "profile",
]
