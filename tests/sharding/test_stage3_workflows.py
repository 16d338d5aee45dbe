"""Stage-3 workflows around models that do not fit: a parameter used on some ranks only, a
meta-built model (ties kept, a parent-level initializer such as GPT-2's scaled ``c_proj``),
and with parameter shards on NVMe a forward under ``torch.inference_mode()`` and loading a
consolidated checkpoint with torch DCP (``set_model_state_dict(broadcast_from_rank0=True)``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import memopt
from memopt.sharding import FSDPOptions
from tests._harness.dist import run_distributed


# -- a parameter with a gradient on some ranks only --------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.side = nn.Linear(6, 6)  # a branch some ranks take (an MoE expert, say)

    def forward(self, x: Tensor, branch: bool) -> Tensor:
        h = torch.tanh(self.lin(x))
        return h + self.side(x) if branch else h


class _AuxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))  # two FSDP2 units
        self.head = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 3)  # an auxiliary head some ranks use (in the root unit)
        self.ghost = nn.Linear(6, 3)  # no rank uses it: it must not move (weight decay)

    def forward(self, x: Tensor, aux: bool, branch: bool) -> Tensor:
        x = self.blocks[1](self.blocks[0](x, False), branch)
        y = self.head(x).pow(2).mean()
        return y + self.aux(x).pow(2).mean() if aux else y


def _uses(rank: int, step: int, micro: int) -> tuple[bool, bool]:
    """(aux, branch): aux on rank 0 in the synchronizing micro-batch only; the branch on rank
    1 in step 0's accumulated micro-batch only (so no rank uses it in step 1)."""
    return rank == 0 and micro == 1, rank == 1 and step == 0 and micro == 0


def _data(rank: int, step: int, micro: int) -> Tensor:
    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    return torch.randn(4, 6, generator=g)


def _aux_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _AuxNet()
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def _aux_reference(world: int) -> tuple[dict[str, Tensor], list[float]]:
    """One process over the global batch: the mean of the ranks' losses per micro-batch."""
    model, opt = _aux_model()
    norms = []
    for step in range(2):
        for micro in range(2):
            loss = sum(model(_data(r, step, micro), *_uses(r, step, micro)) for r in range(world))
            (loss / world).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def _aux_run(rank: int, world: int) -> None:
    want, want_norms = _aux_reference(world)
    model, opt = _aux_model()
    ghost = model.ghost.weight.detach().clone()
    model, opt = memopt.shard(model, opt, stage=3)
    norms = []
    for step in range(2):
        for micro in range(2):
            with opt.no_sync() if micro == 0 else nullcontext():
                model(_data(rank, step, micro), *_uses(rank, step, micro)).backward()
        assert model.ghost.weight.grad is None and model.ghost.bias.grad is None
        if step == 1:  # no rank took the branch this step: it keeps no gradient
            assert model.blocks[1].side.weight.grad is None
        assert model.aux.weight.grad is not None  # (rank 1 reduced zeros for it)
        norms.append(float(opt.clip_grad_norm_(1.0)))
        opt.step()
        opt.zero_grad()
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    assert torch.equal(full["ghost.weight"], ghost)
    for name, value in want.items():
        torch.testing.assert_close(full[name], value, rtol=0, atol=1e-5, msg=name)
    assert max(abs(a - b) for a, b in zip(norms, want_norms, strict=True)) < 1e-5


def test_parameter_used_on_some_ranks_only() -> None:
    """It crashed (gloo: received data size mismatch): FSDP2 reduces only the parameters
    with a gradient. Now it trains as one process does, as at stages 1/2."""
    run_distributed(_aux_run, world_size=2, timeout_s=60)


# -- meta-device models ------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(_Attn() for _ in range(2))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        for b in self.blocks:
            h = h + b.proj(b.qkv(h)[..., :8])
        return self.head(h)


def _gpt2_like_init(m: nn.Module) -> None:
    """GPT-2's pattern: every Linear/Embedding at std 0.02, then the parent scales its
    residual projection (a tensor it does not hold itself)."""
    if isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    if isinstance(m, _Attn):
        nn.init.normal_(m.proj.weight, std=0.001)


def _post_order_init(model: nn.Module) -> None:
    """Transformers' ``initialize_weights`` order: children first, then the module."""
    for child in model.children():
        _post_order_init(child)
    _gpt2_like_init(model)


def _eager_reference() -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = _Tied()
    torch.manual_seed(1)
    with torch.no_grad():
        _post_order_init(model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _meta_tied() -> tuple[nn.Module, torch.optim.Optimizer]:
    with torch.device("meta"):
        model = _Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    return memopt.shard(model, opt, stage=3, fsdp=FSDPOptions(init_fn=_gpt2_like_init))


def _check_meta(model: nn.Module, full: dict[str, Tensor]) -> None:
    want = _eager_reference()
    assert model.head.weight is model.emb.weight  # the tie survived to_empty
    for name, value in want.items():  # the same draws, in the same order, as eager
        assert torch.equal(full[name], value), name
    assert full["blocks.0.proj.weight"].std() < 0.002  # the parent's init ran


def test_meta_model_one_process_keeps_ties_and_parent_init() -> None:
    """World size 1 (no process group): to_empty untied head from emb (head was never
    trained), and the parent-level init never ran."""
    model, opt = _meta_tied()
    _check_meta(model, {n: p.detach() for n, p in model.named_parameters()})
    ids = torch.randint(0, 16, (2, 5))
    model(ids).square().mean().backward()
    opt.step()
    assert model.head.weight is model.emb.weight


def _meta_ranks(rank: int, world: int) -> None:
    model, _ = _meta_tied()
    _check_meta(model, {n: p.full_tensor() for n, p in model.named_parameters()})


def test_meta_model_two_ranks_parent_init() -> None:
    run_distributed(_meta_ranks, world_size=2, timeout_s=60)


def test_meta_gpt2_scaled_residual_init() -> None:
    """The Hugging Face model the report used: c_proj gets 0.02 / sqrt(2 n_layer)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model, _ = memopt.shard(model, opt, stage=3, fsdp=FSDPOptions(init_fn=model._init_weights))
    stds = {n: float(p.detach().std()) for n, p in model.named_parameters() if p.dim() == 2}
    for i in range(2):
        for part in ("attn", "mlp"):
            std = stds[f"transformer.h.{i}.{part}.c_proj.weight"]
            assert 0.009 < std < 0.011, (i, part, std)
        assert 0.018 < stds[f"transformer.h.{i}.mlp.c_fc.weight"] < 0.022
    assert model.lm_head.weight is model.transformer.wte.weight


def test_meta_model_with_real_buffers_names_include_buffers() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    model.register_buffer("scale", torch.ones(4))  # what init_empty_weights() leaves real
    with pytest.raises(ValueError, match=r"include_buffers=True"):
        memopt.shard(model, torch.optim.AdamW(model.parameters()), stage=3)


# -- parameter shards on NVMe --------------------------------------------------------------
class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)


def _nvme_model(path: str, seed: int) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = _Small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return memopt.shard(model, opt, stage=3, offload_params="nvme", param_nvme=path)


def _nvme_inference(rank: int, world: int, path: str) -> None:
    model, opt = _nvme_model(f"{path}/r{rank}", 0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():  # a unit read back from NVMe inside it
        got = model(x)
    assert torch.equal(got, want)
    model(x).sum().backward()  # training goes on
    opt.step()
    opt.close()


def test_nvme_forward_under_inference_mode() -> None:
    """It failed ("Inplace update to inference tensor outside InferenceMode", from the NVMe
    read's copy on the I/O thread), and opt.close() then failed the same way."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run_distributed(_nvme_inference, world_size=2, timeout_s=60, args=(d,))


def _nvme_dcp_load(rank: int, world: int, path: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    torch.manual_seed(7)
    source = {k: v.clone() for k, v in _Small().state_dict().items()}
    model, opt = _nvme_model(f"{path}/r{rank}", 0)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    with pytest.raises(RuntimeError, match=r"'blocks\.0\.weight'.*resident_params"):
        set_model_state_dict(model, dict(source) if rank == 0 else {}, options=options)
    with opt.resident_params():  # the documented recipe
        set_model_state_dict(model, dict(source) if rank == 0 else {}, options=options)
    sd = model.state_dict()  # (clones, unit by unit: no wrap needed)
    for key, value in source.items():
        assert torch.equal(sd[key].full_tensor(), value), key
    model(torch.randn(3, 8)).sum().backward()  # the optimizer is still usable
    opt.step()
    opt.close()


def test_nvme_dcp_broadcast_load_is_an_error_outside_resident_params() -> None:
    """It segfaulted (DCP wrote through to_local() into an evicted, 0-byte shard); it is now
    a RuntimeError naming resident_params(), inside which the load works."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run_distributed(_nvme_dcp_load, world_size=2, timeout_s=60, args=(d,))
