"""param_groups: the targeting policy on a real (tiny, random-init) LLaMA."""

from __future__ import annotations

import pytest
import torch

from memopt._utils.logging import _reset_warn_once
from memopt.optim import GaLoreAdamW, param_groups

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _names(group):
    return set(group["param_names"])


def test_regex_targets_attn_and_mlp_only(llama):
    groups = param_groups(llama, target="attn|mlp", rank=4, weight_decay=0.1)
    low, decay, no_decay = groups
    assert low["rank"] == 4 and low["weight_decay"] == 0.1
    assert len(low["params"]) == 2 * 7
    assert all(".self_attn." in n or ".mlp." in n for n in _names(low))
    assert _names(decay) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert no_decay["weight_decay"] == 0.0
    assert all("norm" in n for n in _names(no_decay))
    every = {n for g in groups for n in g["param_names"]}
    assert every == {n for n, _ in llama.named_parameters()}


def test_all_linear_excludes_the_head(llama):
    (low, *_rest) = param_groups(llama, target="all-linear", rank=4)
    assert "lm_head.weight" not in _names(low) and len(low["params"]) == 14


def test_all_linear_takes_gpt2_conv1d_like_the_estimator():
    # GPT-2's projections are transformers' Conv1D (a Linear stored (in, out)), not nn.Linear.
    from memopt.memory.model import param_infos

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    (low, *_rest) = param_groups(gpt2, target="all-linear", rank=4)
    want = {f"transformer.h.{i}.{m}.weight" for i in range(2)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
    assert _names(low) == want  # lm_head is tied to wte: never a target
    estimated = {i.name for i in param_infos(gpt2, target="all-linear") if i.low_rank}
    assert estimated == want
    opt = GaLoreAdamW(param_groups(gpt2, target="all-linear", rank=4), lr=1e-3)
    gpt2(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    assert len(opt.state) == len(list(gpt2.parameters()))  # the tied lm_head once


def test_head_is_detected_when_tied():
    emb = torch.nn.Embedding(10, 8)
    out = torch.nn.Linear(8, 10, bias=False)
    out.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "proj": torch.nn.Linear(8, 8), "out": out})
    (low, rest) = param_groups(model, target="all-linear", rank=2)
    assert _names(low) == {"proj.weight"}
    assert _names(rest) == {"emb.weight", "proj.bias"}  # the tied weight appears once


def test_exclude_and_list_targets(llama):
    (low, *_rest) = param_groups(llama, target=["q_proj", "v_proj"], exclude=r"layers\.1\.", rank=4)
    assert _names(low) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    }


def test_state_free_groups_for_frugal(llama):
    groups = param_groups(llama, density=0.25, state_free=("embeddings", "norms", "head"))
    free = groups[-1]
    assert free["state_free"] is True
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= _names(free)
    assert all("norm" in n or "embed" in n or "lm_head" in n for n in _names(free))


def test_no_match_is_an_error_listing_linears(llama):
    with pytest.raises(ValueError, match="matched no weight.*q_proj"):
        param_groups(llama, target="attention_block", rank=4)


def test_bad_inputs(llama):
    with pytest.raises(ValueError, match="rank=... .* or density"):
        param_groups(llama)
    with pytest.raises(ValueError, match="state_free kinds"):
        param_groups(llama, rank=4, state_free=("everything",))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        param_groups(llama, target="attn(", rank=4)


def test_rank_above_side_is_clamped_with_warning(llama):
    _reset_warn_once()
    opt = GaLoreAdamW(param_groups(llama, rank=1000), lr=1e-3)
    x = torch.randint(0, 64, (2, 8))
    llama(x, labels=x).loss.backward()
    with pytest.warns(UserWarning, match="clamped to 32"):
        opt.step()
    opt.zero_grad()
    q = llama.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["exp_avg"].shape == (32, 32)


def test_misuse_gets_errors_naming_the_argument(llama):
    with pytest.raises(TypeError, match="pass model, not model.parameters()"):
        param_groups(llama.parameters(), rank=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exclude is empty"):
        param_groups(llama, exclude="", rank=4)
    with pytest.raises(TypeError, match=r"state_free is a tuple of kinds, e.g. \('norms',\)"):
        param_groups(llama, state_free="norms", density=0.25)
    with pytest.raises(TypeError, match="target must be a regex"):
        param_groups(llama, target=None, rank=4)  # type: ignore[arg-type]
    frozen = torch.nn.Sequential(torch.nn.Linear(4, 4)).requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the model is frozen"):
        param_groups(frozen, target="all-linear", rank=2)


def test_a_layer_unfrozen_later_is_added_with_names(llama):
    """Groups from param_groups carry names; an unnamed later group hit torch's bare "with/
    without names" error. memopt says what to pass, and the named group is taken."""
    frozen = llama.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    opt = GaLoreAdamW(param_groups(llama, target="attn|mlp", rank=4), lr=1e-3)
    frozen.requires_grad_(True)
    with pytest.raises(ValueError, match="add_param_group.*param_names=\\[...\\]"):
        opt.add_param_group({"params": [frozen]})
    opt.add_param_group({"params": [frozen], "param_names": ["model.layers.0.mlp.up_proj.weight"]})
    assert opt.param_groups[-1]["params"] == [frozen]
