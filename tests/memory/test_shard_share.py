"""``memopt.memory.sharding`` mirrors ``memopt.sharding`` (layer 2 may not import it): each
rank's predicted optimizer state, parameters and gradients equal what 2 gloo ranks hold
under ``memopt.shard`` after a step, and the restated constants equal the real ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests._harness.dist import run_distributed
from tests.memory.conftest import tiny_config

#: (optimizer, optimizer_kwargs, stage, layout, bucket_bytes, bf16 weights + fp32 masters)
CASES: list[tuple[str, dict[str, Any], int, str, int, bool]] = [
    ("galore", {"rank": 16}, 2, "dim0", 2**14, False),  # right-sided rows + replicated basis
    ("galore", {"rank": 16, "proj": "orthogonal"}, 3, "dim0", 2**20, False),  # seeded: cache
    ("frugal", {"density": 0.25}, 2, "dim0", 2**20, False),
    ("frugal", {"density": 0.5, "proj": "block"}, 3, "dim0", 2**20, False),  # 0-state: rows
    ("apollo_mini", {}, 1, "whole_tensor", 2**14, False),  # owners weighed by state_weight
    ("adamw", {"state_dtype": "int8"}, 2, "dim0", 2**20, False),
    ("galore", {"rank": 16}, 2, "dim0", 2**20, True),  # fp32 copies of the rank's gradients
    ("adamw", {}, 3, "dim0", 2**20, True),  # FSDP2's fp32 shards: parameters and gradients
]


def _optimizer(model: torch.nn.Module, name: str, kw: dict[str, Any]) -> Any:
    import memopt.optim as mo

    if name == "adamw":
        return mo.AdamW(model.parameters(), **kw)
    size = {"rank": 1} if name == "apollo_mini" and "rank" not in kw else {}
    cls = {"galore": mo.GaLoreAdamW, "frugal": mo.FrugalAdamW, "apollo_mini": mo.ApolloMini}
    return cls[name](mo.param_groups(model, **size, **kw))


def _storages(tensors: list[Any]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            t = t.to_local() if hasattr(t, "to_local") else t
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _held(rank: int, world: int) -> list[tuple[int, int, int]]:
    """(optimizer state, parameters, gradients at the step) this rank holds, per case."""
    from transformers import LlamaForCausalLM

    import memopt
    import memopt.optim as mo

    out = []
    for name, kw, stage, layout, bucket, master in CASES:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config()).to(torch.bfloat16 if master else torch.float32)
        opt = _optimizer(model, name, kw)
        extra = {"master_dtype": torch.float32} if master else {}
        model, sopt = memopt.shard(
            model, opt, stage=stage, layout=layout, bucket_bytes=bucket, **extra
        )
        x = torch.randint(0, 256, (1, 8))
        model(input_ids=x, labels=x).loss.backward()
        if stage == 3:
            grads = _storages([p.grad for p in model.parameters()])
        else:
            sopt.finish_grad_sync()
            grads = _storages([t.grad for t in sopt.locals.values()])
        sopt.step()
        sb = mo.state_bytes(opt)
        out.append((sb.total + sb.cache, _storages(list(model.parameters())), grads))
    return out


def test_rank_shares_equal_what_each_rank_holds() -> None:
    from transformers import LlamaForCausalLM

    from memopt.memory.model import param_infos
    from memopt.memory.sharding import rank_shares

    held = run_distributed(_held, world_size=2, timeout_s=240)
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    for i, (name, kw, stage, layout, bucket, master) in enumerate(CASES):
        target = None if name == "adamw" else "attn|mlp"
        infos = param_infos(model, target, torch.bfloat16 if master else torch.float32)
        shares = rank_shares(
            infos, stage, 2, layout, name, kw, param_infos(model, target), bucket, 4 * master
        )
        for rank in range(2):
            s = shares[rank]
            params = s.numel * 4 if master and stage == 3 else s.params  # the shards: masters
            assert (s.state, params, s.grads) == held[rank][i], (name, kw, stage, rank)


def test_estimate_is_the_most_loaded_rank() -> None:
    """GaLore at stage 3: FSDP2 keeps 1/W of every parameter (the figure followed the state
    plan: 0.58 of it for FRUGAL block), the replicated r x n bases are counted."""
    from transformers import LlamaForCausalLM

    from memopt.memory import estimate
    from memopt.memory.model import param_infos
    from memopt.memory.sharding import rank_shares

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    fsdp = sum(-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) * 4 for p in model.parameters())
    for name, kw in (("frugal", {"density": 0.5, "proj": "block"}), ("galore", {"rank": 16})):
        est = estimate(model, optimizer=name, optimizer_kwargs=kw, stage=3, world_size=2,
                       batch_size=1, seq_len=8)  # fmt: skip
        assert est.breakdown["device"]["parameters"] == fsdp
        shares = rank_shares(param_infos(model), 3, 2, "dim0", name, kw)
        assert est.breakdown["device"]["optimizer_state"] == max(s.state for s in shares)


def test_restated_constants_are_memopt_sharding_s() -> None:
    from memopt.memory import sharding
    from memopt.sharding import rowproj

    assert set(sharding.ROW_PROJECTORS) == set(rowproj.ROW_PROJECTORS)
    names = {"GaLoreAdamW": "galore", "FrugalAdamW": "frugal"}
    assert {names[c] for c in rowproj.ROW_LOW_RANK} == set(sharding.ROW_LOW_RANK)


@pytest.mark.filterwarnings("ignore:rank 100")
def test_state_weight_mirrors_rowproj() -> None:
    """The owners' balance weights equal rowproj.state_weight on the real optimizers' groups
    (an SVD projector's rank_for is capped at min(m, n): so is the weight)."""
    from transformers import LlamaForCausalLM

    from memopt.memory import optstate
    from memopt.memory.model import param_infos
    from memopt.memory.sharding import row_reason, state_weight
    from memopt.sharding import rowproj

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    infos = {p.name: p for p in param_infos(model)}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("galore", {"rank": 100, "proj_type": "reverse_std"}),
        ("frugal", {"density": 0.25, "proj": "coordinate"}),
        ("apollo_mini", {"rank": 1}),
        ("galore", {"rank": 8, "proj": "columns"}),
    ]
    for name, kw in cases:
        opt = _optimizer(model, name, kw)
        resolved = optstate.resolve(name, kw)
        for group in opt.param_groups:
            for pname, p in zip(group["param_names"], group["params"], strict=True):
                info = infos[pname]
                assert state_weight(info, resolved) == rowproj.state_weight(opt, group, p)
                real = rowproj.row_reason(opt, group, p)
                assert bool(row_reason(info, name, resolved)) == bool(real), (pname, real)
