"""Stage 3 units and parameters shared between modules (``memopt.sharding.units``).

Before: a head tied to the embedding listed as a unit (the docs' own example), or a weight
shared by two blocks of the default units, passed ``memopt.shard`` and failed at the first
forward with FSDP2's error; a block repeated in a ModuleList made ``memopt.shard`` raise a
bare ``AssertionError`` with the model half-converted. Now a user list is checked before
any change (a ``ValueError`` naming the parameter and units, on one process too), and the
default units leave repeated modules once and shared parameters to the root: both train
like one process on 2 ranks.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import memopt
from memopt.sharding import FSDPOptions
from tests._harness.dist import run_distributed


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.lin(x))


class Net(nn.Module):
    """``kind``: "repeat" (one block object twice in the list), "shared" (two blocks sharing
    a weight), "tied" (a head tied to the embedding)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        blk = Block()
        self.blocks = nn.ModuleList([blk, blk, Block()] if kind == "repeat" else [blk, Block()])
        if kind == "shared":
            self.blocks[1].lin.weight = self.blocks[0].lin.weight
        self.head = nn.Linear(6, 10, bias=False)
        if kind == "tied":
            self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _batches() -> Tensor:
    return torch.randint(0, 10, (3, 4, 5), generator=torch.Generator().manual_seed(1))


def _train(model: nn.Module, opt: Any, rank: int = 0, world: int = 1) -> None:
    for ids in _batches():
        mine = ids[rank::world]
        loss = nn.functional.cross_entropy(model(mine).flatten(0, 1), mine.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def _reference(kind: str) -> dict[str, Tensor]:
    model = Net(kind)
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    return {n: p.detach() for n, p in model.named_parameters()}


def _default_units(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("repeat", "shared", "tied"):
        model = Net(kind)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, opt = memopt.shard(model, opt, stage=3)
        _train(model, opt, rank, world)
        out[kind] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        out[kind + "_warned"] = [
            str(w.message) for w in caught if "default units" in str(w.message)
        ]
    return out


def test_default_units_with_repeated_and_shared_modules_train_like_one_process() -> None:
    outs = run_distributed(_default_units, world_size=2, timeout_s=120)
    for kind in ("repeat", "shared", "tied"):
        ref = _reference(kind)
        for rank, out in enumerate(outs):
            assert out[kind].keys() == ref.keys(), (kind, rank)
            for name, want in ref.items():
                err = (out[kind][name] - want).abs().max().item()
                assert err < 1e-6, f"{kind} rank {rank}: {name} off by {err:.3g}"
    # the shared weight moved both blocks to the root, and memopt said so
    assert any("'blocks.0'" in w and "'blocks.1'" in w for w in outs[0]["shared_warned"])
    assert outs[0]["repeat_warned"] == [] and outs[0]["tied_warned"] == []


@pytest.mark.parametrize(
    ("kind", "units", "needle"),
    [
        ("tied", lambda m: [*m.blocks, m.head], "'head.weight'"),
        ("shared", lambda m: list(m.blocks), "'blocks.0.lin.weight'"),
        ("repeat", lambda m: list(m.blocks), "lists the module 'blocks.0' more than once"),
    ],
)
def test_a_user_unit_list_splitting_a_parameter_is_refused_before_any_change(
    kind: str, units: Any, needle: str
) -> None:
    model = Net(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [(n, p) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match="memopt.shard\\(stage=3\\)") as info:
        memopt.shard(model, opt, stage=3, fsdp=FSDPOptions(modules=units(model)))
    assert needle in str(info.value) or needle.replace("head.weight", "emb.weight") in str(
        info.value
    ), str(info.value)
    if kind != "repeat":
        assert "FSDPOptions.modules" in str(info.value) and "root" in str(info.value)
    assert [(n, p) for n, p in model.named_parameters()] == before  # nothing converted
    assert all(type(p) is nn.Parameter for _, p in before)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for _, p in before]
