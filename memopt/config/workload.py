"""The recipe's model and data, from the ``model`` and ``data`` sections (nothing downloaded).

- Model: a randomly initialized ``transformers.LlamaForCausalLM`` from a named preset plus
  ``model.overrides``; with ``data.source: stdlib`` the vocabulary is 256 (bytes);
  ``model.init_from`` then loads the weights of a snapshot (a fine-tuning start).
- Data: ``stdlib`` reads the running interpreter's standard-library ``.py`` files in sorted
  order (site-packages skipped) up to ``data.max_bytes`` and serves random windows of
  ``seq_len`` bytes (the labels are the inputs: the model shifts them); each rank draws from
  its own generator (``seed + 1000 * rank``), so ranks see different batches, and a resumed
  run continues the sequence of draws (the generator is advanced past the steps taken).
  ``random`` draws uniform tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from memopt.config._fields import did_you_mean
from memopt.config.cast import cast_model
from memopt.config.config import Config
from memopt.config.sections import PRESETS

BYTE_VOCAB = 256
_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}


def llama_config(config: Config) -> Any:
    """The ``transformers.LlamaConfig`` the model section describes."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(PRESETS[config.model.preset])
    kwargs["max_position_embeddings"] = max(config.train.seq_len, 128)
    kwargs["use_cache"] = False  # training: no KV cache (recompute would replay it)
    if config.data.source == "stdlib":
        kwargs["vocab_size"] = BYTE_VOCAB
    else:
        kwargs.setdefault("vocab_size", 1024)
    known = set(LlamaConfig().to_dict())
    unknown = sorted(set(config.model.overrides) - known)
    if unknown:  # LlamaConfig would keep a misspelt key as an attribute and ignore it
        raise ValueError(f"model.overrides: LlamaConfig has no {unknown}"
                         f"{did_you_mean(unknown, known)}")
    kwargs.update(config.model.overrides)
    if config.data.source == "stdlib" and kwargs["vocab_size"] != BYTE_VOCAB:
        raise ValueError(f"model.overrides.vocab_size={kwargs['vocab_size']} with data.source: "
                         f"stdlib; byte-level text needs vocab_size {BYTE_VOCAB}")
    try:
        return LlamaConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.overrides: {e}") from None
    except Exception as e:  # huggingface_hub's StrictDataclass validation errors
        if "Validation" not in type(e).__name__:
            raise
        raise ValueError(f"model.overrides: {' '.join(str(e).split())}") from None


def build_model(config: Config) -> torch.nn.Module:
    """A random-init LLaMA (seeded by ``train.seed``, identical on every rank)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(config.train.seed)
    model: torch.nn.Module = LlamaForCausalLM(llama_config(config))
    if config.model.dtype == "bf16":  # parameters; RoPE inv_freq stays fp32 (memopt.config.cast)
        cast_model(model, torch.bfloat16)
    if config.model.init_from:
        load_weights(model, config.model.init_from)
    return model


def load_weights(model: torch.nn.Module, directory: str) -> int:
    """Load the model weights of the newest snapshot in ``directory``; returns its step."""
    from memopt.checkpoint import AsyncCheckpointer

    if not os.path.isdir(directory):  # (AsyncCheckpointer would create it)
        raise ValueError(f"model.init_from={directory!r} is not a directory of snapshots")
    ck = AsyncCheckpointer(directory, restore_rng=False)
    try:
        step = ck.latest()
        if step is None:
            raise ValueError(f"model.init_from={directory!r} holds no published snapshot")
        ck.load(step, model=model)
        return step
    finally:
        ck.close()


def stdlib_bytes(max_bytes: int) -> torch.Tensor:
    """Up to ``max_bytes`` of the standard library's sources as a uint8 tensor."""
    root = Path(os.path.dirname(os.__file__))
    parts: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            data = (Path(dirpath) / name).read_bytes() + b"\n"
            parts.append(data)
            total += len(data)
            if total >= max_bytes:
                return torch.frombuffer(bytearray(b"".join(parts)[:max_bytes]), dtype=torch.uint8)
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def batches(config: Config, rank: int = 0, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless ``(batch_size, seq_len)`` int64 token batches for this rank."""
    t = config.train
    gen = torch.Generator().manual_seed(t.seed + 1000 * rank)
    if config.data.source == "stdlib":
        text = stdlib_bytes(config.data.max_bytes)
        if text.numel() <= t.seq_len:
            raise ValueError(f"data.max_bytes={config.data.max_bytes} is shorter than one "
                             f"sequence of train.seq_len={t.seq_len}")

        def draw() -> torch.Tensor:
            starts = torch.randint(0, text.numel() - t.seq_len, (t.batch_size,), generator=gen)
            return torch.stack([text[s : s + t.seq_len] for s in starts.tolist()]).long()
    else:
        vocab = llama_config(config).vocab_size

        def draw() -> torch.Tensor:
            return torch.randint(0, vocab, (t.batch_size, t.seq_len), generator=gen)

    for _ in range(start_step * t.grad_accum):  # a resumed run continues the same sequence
        draw()
    while True:
        yield draw()
