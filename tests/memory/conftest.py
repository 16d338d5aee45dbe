"""Shared tiny models for the memory tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(hidden: int = 64, layers: int = 2, vocab: int = 256) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 3 - 20,  # not a multiple of 64: exercises rectangular sides
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
    )


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())
