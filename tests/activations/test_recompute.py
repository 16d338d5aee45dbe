"""Recompute: full and selective checkpointing per block, RNG restored, kwargs, kept ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.activations import ActivationOptions, SavedLedger, apply
from memopt.activations.hooks import managed_block
from memopt.activations.policy import recompute
from tests.activations._models import (
    grads,
    llama_batch,
    llama_loss,
    make_stack,
    same,
    stack_loss,
    tiny_llama,
)

COUNT = ActivationOptions(count_recomputed_ops=True)


def _seeded(loss_fn, seed: int = 7):  # type: ignore[no-untyped-def]
    def run(model):  # type: ignore[no-untyped-def]
        torch.manual_seed(seed)
        return loss_fn(model)

    return run


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_full_recompute_with_dropout_matches() -> None:
    model = make_stack(p=0.3)
    x = torch.randn(32, 64)
    loss = _seeded(stack_loss(x))
    ref = grads(model, loss)
    other_seed = grads(model, _seeded(stack_loss(x), seed=8))
    assert not same(other_seed, ref), "dropout must be active for this test to mean anything"
    mgr = apply(model, {f"blocks.{i}": recompute() for i in range(4)}, options=COUNT)
    _close(grads(model, loss), ref)
    stats = mgr.installed["blocks.0"].stats
    assert stats.calls == 1
    assert stats.recomputed["aten.addmm"] == 1 and stats.recomputed["aten.bernoulli_"] == 1
    mgr.remove()


def test_selective_recompute_keeps_listed_ops() -> None:
    model = make_stack(p=0.3)
    x = torch.randn(32, 64)
    loss = _seeded(stack_loss(x))
    ref = grads(model, loss)
    names = [f"blocks.{i}" for i in range(4)]

    full = apply(model, {n: recompute() for n in names}, options=COUNT)
    _close(grads(model, loss), ref)
    full_peak = full.ledger.peak("device")
    full.remove()

    sel = apply(model, {n: recompute(keep_ops=("aten.addmm",)) for n in names}, options=COUNT)
    _close(grads(model, loss), ref)
    for n in names:
        counted = sel.installed[n].stats.recomputed
        assert counted["aten.addmm"] == 0, "a kept op must be served from the cache"
        assert counted["aten.gelu"] == 1 and counted["aten.native_layer_norm"] == 1
    # the kept addmm outputs (32x64 fp32 per block) are held in addition to the inputs
    assert sel.ledger.peak("device") == full_peak + 4 * 32 * 64 * 4
    sel.remove()


def test_tiny_llama_recompute_with_kwargs_and_dropout() -> None:
    model = tiny_llama(layers=2, dropout=0.2)
    ids = llama_batch(seq=64)
    loss = _seeded(llama_loss(ids))
    ref = grads(model, loss)
    plan = {"model.layers.0": recompute(), "model.layers.1": recompute(("aten.mm", "aten.bmm"))}
    mgr = apply(model, plan, options=COUNT)
    _close(grads(model, loss), ref)
    full = mgr.installed["model.layers.0"].stats.recomputed
    # q k v o gate up re-run; down_proj is not (early stop: its output is not needed by backward)
    assert full["aten.mm"] == 6 and full["aten.bmm"] == 2
    kept = mgr.installed["model.layers.1"].stats.recomputed
    assert kept["aten.mm"] == 0 and kept["aten.bmm"] == 0 and kept["aten._softmax"] == 1
    mgr.remove()
    assert same(grads(model, loss), ref)


def test_kv_cache_dropped_with_warning() -> None:
    model = tiny_llama(layers=2)
    ids = llama_batch(seq=32)
    ref = grads(model, llama_loss(ids))
    mgr = apply(model, {"model.layers.0": recompute(), "model.layers.1": recompute()})
    with pytest.warns(UserWarning, match="KV cache"):
        g = grads(model, lambda m: m(input_ids=ids, labels=ids, use_cache=True).loss)
    _close(g, ref)
    mgr.remove()


def test_ledger_counts_inputs_until_backward() -> None:
    model = make_stack()
    x = torch.randn(16, 64)
    ledger = SavedLedger()
    mgr = apply(model, {f"blocks.{i}": recompute() for i in range(4)}, ledger=ledger)
    loss = stack_loss(x)(model)
    assert ledger.current("device") == 4 * 16 * 64 * 4  # each block's input, nothing else
    loss.backward()
    assert ledger.current("device") == 0
    mgr.remove()


def test_unknown_keep_op_is_an_error_and_nothing_installed() -> None:
    model = make_stack()
    with pytest.raises(ValueError, match="not a known operator"):
        apply(model, {"blocks.0": recompute(), "blocks.1": recompute(("aten.not_an_op",))})
    with pytest.raises(ValueError, match="namespace.op"):
        apply(model, {"blocks.0": recompute(("mm",))})
    assert all(managed_block(b) is None for b in model.blocks)
    assert all("forward" not in b.__dict__ for b in model.blocks)


def test_no_grad_runs_plain_forward() -> None:
    model = make_stack()
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = model(x)
    mgr = apply(model, {"blocks.0": recompute()}, options=COUNT)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert mgr.installed["blocks.0"].stats.calls == 0
    mgr.remove()


@pytest.mark.parametrize("keep_ops", [(), ("aten.convolution",)])
def test_replay_does_not_update_batchnorm_statistics_again(keep_ops) -> None:  # type: ignore[no-untyped-def]
    """The backward's replay of a recomputed block runs BatchNorm in train mode again; its
    running statistics must count each batch once, as without recompute (plain
    torch.utils.checkpoint counts it twice). Two steps, two forwards before one backward."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        return nn.Sequential(block, nn.Flatten(), nn.Linear(8 * 8 * 8, 1))

    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]

    def run(model: nn.Module) -> None:
        model(xs[0]).sum().backward()
        (model(xs[1]).sum() + model(xs[2]).sum()).backward()

    ref = make()
    run(ref)
    model = make()
    with apply(model, {"0": recompute(keep_ops=keep_ops)}):
        run(model)
    bn_ref, bn = ref[0][1], model[0][1]
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 3
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_kv_cache_passed_positionally_is_dropped() -> None:
    """GPT-2 (transformers 5) calls ``block(hidden, past_key_values, mask, ...)``: the cache is
    the second positional argument. Kept, the replay appended K/V again and eager attention
    failed with a shape mismatch in the backward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from memopt._utils.logging import _reset_warn_once

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = grads(model, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss)
    _reset_warn_once()
    with apply(model, {"transformer.h.0": recompute(), "transformer.h.1": recompute()}):
        with pytest.warns(UserWarning, match=r"\w+ set to None \(a KV cache"):  # (its name varies)
            g = grads(model, lambda m: m(input_ids=ids, labels=ids, use_cache=True).loss)
    _close(g, ref)


@pytest.mark.parametrize("keep_ops", [(), ("aten.addmm",)])
def test_replay_sees_buffers_as_the_forward_did(keep_ops) -> None:  # type: ignore[no-untyped-def]
    """spectral_norm's forward advances its power-iteration buffers u, v and then reads them.
    The replay must start from the values the forward started from (it ran a second power
    iteration from the advanced ones: weight gradients 2% off), and leave the advanced ones."""
    from torch.nn.utils.parametrizations import spectral_norm

    def make() -> nn.Module:
        torch.manual_seed(0)
        block = nn.Sequential(spectral_norm(nn.Linear(32, 32)), nn.Tanh())
        return nn.Sequential(block, nn.Linear(32, 1))

    xs = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ref, model = make(), make()
    for x in xs:
        ref(x).pow(2).mean().backward()
    with apply(model, {"0": recompute(keep_ops=keep_ops)}):
        for x in xs:
            model(x).pow(2).mean().backward()
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(ref.buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b)
