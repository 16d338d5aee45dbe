"""Adapters to other training stacks (layer 5): ``memopt.integrations.hf`` (Hugging Face
``Trainer``) and ``memopt.integrations.accelerate``. Import the submodule you need;
``import memopt`` and this package never import ``transformers`` or ``accelerate``.
"""

from __future__ import annotations

__all__ = ["accelerate", "hf"]
