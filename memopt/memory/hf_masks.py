"""Transformers' attention-mask helpers on meta tensors, for the trace.

A ``transformers`` model builds its attention mask with helpers that read tensor values:

- without a KV cache and without an ``attention_mask`` (a training step), it looks for packed
  sequences in the position ids (``find_packed_sequence_indices``: ``(...).all()``);
- with an ``attention_mask``, it asks whether the mask is all ones, to skip building the 4-D
  mask (SDPA's ``is_causal``) or to skip padding handling.

Meta tensors have no values, so each of these is a ``.item()`` the trace cannot run. While
``meta_mask_values`` is active (one trace), for meta tensors only:

- ``find_packed_sequence_indices`` answers "one sequence per row" (None), which is what it
  answers for ordinary (unpacked) batches: the mask is then the plain causal one;
- ``is_tracing`` answers True, so the helpers take the path transformers itself takes when it
  cannot read values (``torch.compile``/export): the padding mask is assumed to hold padding
  and the full mask is built. An estimate with an ``attention_mask`` input therefore counts
  the mask a padded batch builds (pass no mask for an unpadded batch).

Nothing is patched when ``transformers.masking_utils`` is not loaded (no transformers model
can be in use then); the patches are module attributes, restored on exit (not thread-safe,
like the trace's SDPA routing).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from torch import Tensor

__all__ = ["meta_mask_values"]


def _is_meta(t: Any) -> bool:
    return isinstance(t, Tensor) and t.device.type == "meta"


@contextlib.contextmanager
def meta_mask_values() -> Iterator[None]:
    """Answer transformers' value-reading mask checks for meta tensors (module docstring)."""
    mu = sys.modules.get("transformers.masking_utils")
    names = ("find_packed_sequence_indices", "is_tracing")
    if mu is None or not all(hasattr(mu, n) for n in names):
        yield
        return
    orig = {n: getattr(mu, n) for n in names}

    def find_packed_sequence_indices(position_ids: Any) -> Any:
        if _is_meta(position_ids):
            return None
        return orig["find_packed_sequence_indices"](position_ids)

    def is_tracing(tensor: Any = None) -> Any:
        return _is_meta(tensor) or orig["is_tracing"](tensor)

    patched = {
        "find_packed_sequence_indices": find_packed_sequence_indices,
        "is_tracing": is_tracing,
    }
    for n, f in patched.items():
        setattr(mu, n, f)
    try:
        yield
    finally:
        for n, f in orig.items():
            setattr(mu, n, f)
