"""The meta trace's saved-activation bytes equal those of a real CPU forward."""

from __future__ import annotations

import torch
from torch import nn

from memopt.memory.trace import causal_lm_inputs, find_blocks, meta_copy, trace_step


def real_saved_bytes(model: nn.Module, **inputs: torch.Tensor) -> int:
    """Distinct storages autograd saves in a real forward, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    loss = out.loss if hasattr(out, "loss") else out.sum()
    loss.backward()
    return sum(saved.values())


def test_llama_meta_trace_equals_real_forward(tiny_llama) -> None:
    x = torch.randint(0, 256, (3, 32))
    real = real_saved_bytes(tiny_llama, input_ids=x, labels=x)
    traced = trace_step(meta_copy(tiny_llama), causal_lm_inputs(3, 32))
    assert traced.saved_bytes == real
    assert len(traced.block_saved) == 2 and all(b > 0 for b in traced.block_saved)
    # the trace's peak holds the saved activations plus the backward's temporaries
    assert traced.peak >= traced.peak_activations >= traced.saved_bytes
    n_param_bytes = sum(p.numel() * 4 for p in tiny_llama.parameters())
    assert traced.gradients == n_param_bytes  # every gradient live at the end, fp32


def test_mlp_trace_is_exact_by_hand() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 16, device="meta")
    traced = trace_step(meta_copy(model), {"input": x})
    # Linear saves its input (5x16, 5x32); ReLU saves its output (5x32, shared with the
    # second Linear's input storage: counted once)
    assert traced.saved_bytes == 4 * (5 * 16 + 5 * 32)
    real = real_saved_bytes(model, input=torch.randn(5, 16))
    assert traced.saved_bytes == real


def test_recompute_keeps_block_inputs_only(tiny_llama) -> None:
    meta = meta_copy(tiny_llama)
    keep = trace_step(meta, causal_lm_inputs(2, 64))
    recompute = trace_step(meta_copy(tiny_llama), causal_lm_inputs(2, 64), recompute=True)
    block_input = 2 * 64 * 64 * 4  # hidden states entering a block, fp32
    assert keep.block_input == block_input
    # outside the blocks both keep the same; inside, recompute keeps only each block's inputs
    # (hidden states, rotary cos/sin, masks): a few block inputs per block, not its activations
    outside = keep.live_after_forward - sum(keep.block_saved)
    inside = recompute.live_after_forward - outside
    assert 2 * block_input <= inside <= 2 * 3 * block_input
    assert inside < 0.15 * sum(keep.block_saved)
    # the recomputed block's activations come back during backward, as temporaries
    assert recompute.peak_temporaries > max(keep.block_saved)


def test_meta_copy_allocates_nothing(tiny_llama) -> None:
    meta = meta_copy(tiny_llama)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(p.device.type == "cpu" for p in tiny_llama.parameters())
    assert len(find_blocks(meta)) == 2


def _llama(attn: str = "sdpa", use_cache: bool = True, layers: int = 2) -> nn.Module:
    from transformers import LlamaForCausalLM

    from tests.memory.conftest import tiny_config

    cfg = tiny_config(layers=layers)
    cfg._attn_implementation = attn
    cfg.use_cache = use_cache
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_frozen_parameters_take_no_gradient_hook(tiny_llama) -> None:
    """A frozen parameter has no gradient: the trace must not hook it (it raised)."""
    tiny_llama.model.embed_tokens.weight.requires_grad_(False)
    traced = trace_step(meta_copy(tiny_llama), causal_lm_inputs(2, 16))
    trainable = sum(p.numel() * 4 for p in tiny_llama.parameters() if p.requires_grad)
    assert traced.gradients == trainable


def test_recompute_traces_blocks_without_kv_cache() -> None:
    """A checkpointed block gets no KV cache (as memopt's recompute): the figure does not
    depend on the config's use_cache, equals the same trace of a real model run without a
    cache, and eager attention (whose replay saw the doubled cache) traces at all."""
    b, n = 2, 64
    x = torch.randint(0, 256, (b, n))
    real = trace_step(_llama(use_cache=False), {"input_ids": x, "labels": x}, recompute=True)
    for attn in ("sdpa", "eager"):
        peaks = []
        for use_cache in (True, False):
            model = meta_copy(_llama(attn, use_cache))
            peaks.append(trace_step(model, causal_lm_inputs(b, n), recompute=True).peak)
            assert all("forward" not in blk.__dict__ for blk in find_blocks(model))  # unwrapped
        assert peaks[0] == peaks[1], attn
        if attn == "sdpa":  # meta inputs: labels a storage of their own (+ b n 8 bytes)
            assert real.peak <= peaks[0] <= real.peak + b * n * 8


def test_attention_mask_and_no_cache_trace_on_meta() -> None:
    """Without a cache, and with an attention_mask, transformers reads tensor values
    (packed-sequence and all-ones checks): on meta those were .item() errors. A meta mask is
    taken as padded: the saved bytes equal a real forward with a padded batch."""
    b, n = 2, 32
    x = torch.randint(0, 256, (b, n))
    pad = torch.ones(b, n, dtype=torch.long)
    pad[0, n // 2 :] = 0
    for attn in ("sdpa", "eager"):
        model = _llama(attn, use_cache=False)
        plain = trace_step(meta_copy(model), causal_lm_inputs(b, n))
        assert plain.saved_bytes == real_saved_bytes(model, input_ids=x, labels=x)
        inputs = causal_lm_inputs(b, n)
        inputs["attention_mask"] = torch.ones(b, n, dtype=torch.long, device="meta")
        masked = trace_step(meta_copy(model), inputs)
        real = real_saved_bytes(model, input_ids=x, labels=x, attention_mask=pad)
        assert masked.saved_bytes == real, attn
    from transformers import masking_utils

    assert masking_utils.find_packed_sequence_indices.__module__ == masking_utils.__name__


def test_t5_learned_position_bias_stays_differentiable() -> None:
    """T5 passes its position bias as a grad-requiring attn_mask: the fused kernel cannot
    differentiate it (the trace raised); those calls keep SDPA's own path, as on a real CPU."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, dropout_rate=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg)
    assert model.config._attn_implementation == "sdpa"
    ids, labels = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 16))
    real = real_saved_bytes(model, input_ids=ids, labels=labels)
    meta = {"input_ids": ids.to("meta"), "labels": labels.to("meta")}
    assert trace_step(meta_copy(model), meta).saved_bytes == real
