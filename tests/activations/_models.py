"""Small models shared by the swap / recompute / apply tests (random init, no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Block(nn.Module):
    """Linear -> GELU -> dropout -> LayerNorm with a residual; ``p`` > 0 makes dropout active."""

    def __init__(self, width: int, p: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()
        self.drop = nn.Dropout(p)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + self.norm(self.drop(self.act(self.fc(x)))) * scale


class Stack(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, p) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=0.5)
        return self.head(x)


def make_stack(seed: int = 0, **kw: float) -> Stack:
    torch.manual_seed(seed)
    return Stack(**kw)  # type: ignore[arg-type]


def tiny_llama(layers: int = 2, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
        attention_dropout=dropout,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def llama_batch(seq: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=g)


def grads(model: nn.Module, loss_fn) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def llama_loss(ids: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss


def stack_loss(x: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda m: m(x).pow(2).mean()


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Flag:
    """Quacks like the IOFuture a swap's ``Pending`` may wrap: done when the test (or a
    ``wait``) says so (copy backends that report copies in flight, as CUDA's do)."""

    def __init__(self, log: list[Flag]) -> None:
        self.finished = False
        log.append(self)

    def done(self) -> bool:
        return self.finished

    def wait(self, timeout: float | None = None) -> None:
        self.finished = True


def profiled_llama(*, hidden: int, intermediate: int, layers: int, vocab: int,
                   max_positions: int, batch: int, seq: int, ops: bool = True) -> Any:
    """(model, batch, profile) of a random-init LLaMA (4 heads, seed 0), profiled once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import memopt.activations as act

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
        max_position_embeddings=max_positions, use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, vocab, (batch, seq))
    data = {"input_ids": ids, "labels": ids}
    return model, data, act.profile(model, data, repeats=1, ops=ops)
