"""Block discovery and the step profile: exact saved bytes, parameters excluded, grads kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.activations.blocks import find_blocks
from memopt.activations.profile import measure_copy_bandwidth, profile


class MLPBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Stack(nn.Module):
    def __init__(self, d: int = 32, h: int = 96, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(MLPBlock(d, h) for _ in range(n))
        self.heads = nn.ModuleList([nn.Linear(d, 2)])  # a smaller ModuleList: not the blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.heads[0](x)


def test_find_blocks_default_regex_names_and_errors() -> None:
    model = Stack()
    assert [n for n, _ in find_blocks(model)] == ["layers.0", "layers.1", "layers.2"]
    assert [n for n, _ in find_blocks(model, r"layers\.[02]")] == ["layers.0", "layers.2"]
    assert [n for n, _ in find_blocks(model, ["layers.1"])] == ["layers.1"]
    with pytest.raises(ValueError, match="unknown block names .*layers.7"):
        find_blocks(model, ["layers.7"])
    with pytest.raises(ValueError, match="matches no module"):
        find_blocks(model, r"blocks\.\d+")
    with pytest.raises(ValueError, match="inside block"):
        find_blocks(model, ["layers.0", "layers.0.up"])
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_profile_counts_exact_bytes_without_weights() -> None:
    torch.manual_seed(0)
    d, h, rows = 32, 96, 64
    model = Stack(d, h)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(rows, d)
    prof = profile(model, x, lambda m, b: m(b).square().mean(), repeats=2)
    # each block saves its input (up's input) and the ReLU output (down's input, same storage
    # as what ReLU saves): rows * (d + h) floats; weights are not counted
    for b in prof.blocks:
        assert b.saved_bytes == rows * (d + h) * 4
        assert b.input_bytes == rows * d * 4 and b.input_saved
        assert b.linear_input_bytes == b.saved_bytes
        assert b.linears == ((d, rows, 4), (h, rows, 4))
        assert b.forward_s > 0 and b.backward_s > 0
    # outside the blocks: the input layer saves x; the head saves the last block's output
    # and square() saves the head's output
    head = rows * d * 4 + rows * 2 * 4
    assert prof.head_saved_bytes == head
    assert prof.nonblock_saved_bytes == rows * d * 4 + head
    assert prof.measured_peak_bytes == prof.unmanaged_peak_bytes
    for n, p in model.named_parameters():  # grads restored, parameters untouched
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
        assert torch.equal(p.detach(), before[n])
    assert "layers.1" in prof.table()


def test_copy_bandwidth_is_measured() -> None:
    d2h, h2d = measure_copy_bandwidth(torch.device("cpu"), 8 << 20)
    assert 1e8 < d2h < 1e12 and 1e8 < h2d < 1e12


def test_profile_tiny_llama() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (1, 128))
    prof = profile(model, {"input_ids": ids, "labels": ids}, repeats=1)
    assert [b.name for b in prof.blocks] == ["model.layers.0", "model.layers.1"]
    assert prof.blocks[0].saved_bytes == prof.blocks[1].saved_bytes > 20 * 128 * 64 * 4
    assert prof.blocks[0].input_bytes == 128 * 64 * 4
    assert 0 < prof.head_saved_bytes <= prof.nonblock_saved_bytes
    assert prof.measured_peak_bytes == prof.unmanaged_peak_bytes


def test_profile_leaves_no_trace() -> None:
    """profile runs real training steps: it must give back the gradients, the running
    statistics of BatchNorm-like buffers and the RNG streams as it found them."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.1)) for _ in range(2)
    )
    model = nn.Sequential(*blocks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    profile(model, x, blocks=[f"{i}" for i in range(2)], repeats=1, ops=False)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_profile_refuses_a_model_sharded_with_gradient_hooks() -> None:
    """memopt.shard at stage 2 on several ranks (gradient hooks) or stage 3 (FSDP2) marks the
    model; profiling steps there ran the sharded reduction ('gradient arrived twice') or
    crashed on FSDP2's storage-less parameters. Planning before sharding is the way."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model.__dict__["_memopt_sharded_stage"] = 3  # what the multi-rank sharded optimizers set
    with pytest.raises(ValueError, match="Plan on the model before memopt.shard"):
        profile(model, torch.randn(2, 8), blocks=["0", "1"], repeats=1, ops=False)


def test_split_only_offered_with_a_token_dimension() -> None:
    """A token-local block fed 2-D [N, features]: split's seq_dim 1 is the features, so the
    profile marks it unsplittable (the planner offered split(0.75) and the applied plan
    failed on its first forward); fed [B, L, features] it stays splittable."""
    from memopt.activations import apply, plan

    torch.manual_seed(0)
    model = Stack(32, 96)
    for layer in model.layers:
        layer._memopt_token_local = True  # (an MLP: applied row by row)
    flat = profile(model, torch.randn(64, 32), repeats=1, ops=False)
    assert all(b.split_input_bytes is None for b in flat.blocks)
    seq = profile(model, torch.randn(2, 32, 32), repeats=1, ops=False)
    assert all(b.split_input_bytes for b in seq.blocks)
    x = torch.randn(64, 32)
    chosen = plan(model, x, "60%", actions=("keep", "split", "recompute"), profile=flat)
    assert {d.policy.action for d in chosen.decisions} == {"keep", "recompute"}
    with apply(model, chosen):
        model(x).sum().backward()


def test_profile_refuses_a_managed_model() -> None:
    """The managers' hooks are innermost: profiling managed blocks saw almost none of their
    saves (a 3x under-stated peak, and plans that blew their budget)."""
    from memopt.activations import apply, plan
    from memopt.activations.policy import swap

    model = Stack()
    x = torch.randn(8, 32)
    with apply(model, {"layers.1": swap()}):
        with pytest.raises(ValueError, match=r"managed .*'layers.1'.*remove\(\)"):
            profile(model, x, repeats=1, ops=False)
        with pytest.raises(ValueError, match=r"remove\(\)"):
            plan(model, x, "50%")
    assert profile(model, x, repeats=1, ops=False).blocks[1].saved_bytes > 0
