"""Recognising a transformers KV cache among a block's arguments.

A recomputed (checkpointed) block must not get one: the backward's replay would append to it
a second time. transformers names the argument differently across models and releases
(``past_key_values``, GPT-2's ``layer_past``, ``past_key_value``; 5.24 renamed it ``cache``),
so a value is also recognised by its class (a ``transformers`` ``Cache``), checked by name so
that transformers stays optional.
"""

from __future__ import annotations

from typing import Any

CACHE_KWARGS = ("past_key_values", "layer_past", "past_key_value", "cache")


def is_hf_cache(value: Any) -> bool:
    """A ``transformers`` ``Cache`` instance."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(value).__mro__)  # fmt: skip


def is_kv_cache(name: str, value: Any) -> bool:
    """Whether an argument called ``name`` holding ``value`` is a KV cache to drop."""
    return value is not None and (name in CACHE_KWARGS or is_hf_cache(value))


__all__ = ["CACHE_KWARGS", "is_hf_cache", "is_kv_cache"]
