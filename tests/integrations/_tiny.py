"""A tiny random-init LLaMA and a token dataset for the integration tests (no downloads)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB, SEQ = 256, 16


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


class Tokens(Dataset):  # type: ignore[type-arg]
    """Byte-level tokens of this repository's own source text, ``n`` windows of ``SEQ``."""

    def __init__(self, n: int = 24) -> None:
        raw = open(__file__, "rb").read()
        ids = torch.tensor(list(raw[: n * SEQ]), dtype=torch.long)
        self.rows = ids.view(n, SEQ)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}
