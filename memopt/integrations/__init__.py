"""Adapters to other training stacks (layer 5): ``memopt.integrations.hf`` (Hugging Face
``Trainer``) and ``memopt.integrations.accelerate``. Import the submodule you need;
``import memopt`` and this package never import ``transformers`` or ``accelerate``.

Shared helpers: ``apply_budget(model, batch, budget)`` (plan and install activation policies
under a byte budget) and ``memory_by_tier()`` (host RSS, arena/pinned bytes, CUDA allocated).
See docs/integrations.md.
"""

from __future__ import annotations

from memopt.integrations._activations import apply_budget, first_batch
from memopt.integrations._memory import format_memory, memory_by_tier

__all__ = ["apply_budget", "first_batch", "format_memory", "memory_by_tier"]
