"""memopt's optimizer state through torch DCP's flattened state dicts (sweep48 F4).

``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` (torchtitan's
checkpointer) takes tensors, ints, floats and dicts only: the seeded projectors' ``[rows,
cols]`` list made it refuse APOLLO, APOLLO-Mini, random-projection GaLore and FRUGAL's
seeded selections. Its load fills each key a fresh optimizer holds and the checkpoint lacks
with ``{}`` (memopt's ``cache_*``, then read as the basis) and keeps only the keys a fresh
optimizer's first step writes (FRUGAL's ``moments_since`` was lost). Checkpoints written
before, with the list, still load.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import memopt.optim as mo

Build = Callable[[nn.Module], torch.optim.Optimizer]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 4)
    )


def _groups(model: nn.Module, **low_rank: object) -> list[dict]:
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.dim() == 2], "update_proj_gap": 2, **low_rank},
            {"params": [p for p in ps if p.dim() < 2]}]  # fmt: skip


BUILDERS: dict[str, Build] = {
    "apollo": lambda m: mo.ApolloAdamW(_groups(m, rank=4), lr=1e-2),
    "apollo_mini": lambda m: mo.ApolloMini(_groups(m, rank=1), lr=1e-2),
    "galore_random": lambda m: mo.GaLoreAdamW(_groups(m, rank=4, proj="random"), lr=1e-2),
    "frugal_orthogonal": lambda m: mo.FrugalAdamW(
        _groups(m, density=0.25, proj="orthogonal"), lr=1e-2
    ),
    "frugal_columns": lambda m: mo.FrugalAdamW(_groups(m, density=0.25, proj="columns"), lr=1e-2),
    "natural_galore": lambda m: mo.NaturalGaLoreAdamW(_groups(m, rank=4), lr=1e-2),
}


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 64, generator=gen), torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


Save = Callable[[nn.Module, torch.optim.Optimizer], object]
Load = Callable[[nn.Module, torch.optim.Optimizer, object], None]


def _resume_matches(build: Build, save: Save, load: Load) -> None:
    """Train 5 steps (two refreshes), save, load into a fresh optimizer, go on 3 steps: the
    same bits as the uninterrupted run."""
    model = _model()
    opt = build(model)
    _steps(model, opt, 5, seed=1)
    saved = copy.deepcopy(save(model, opt))
    twin = copy.deepcopy(model)
    other = build(twin)
    load(twin, other, saved)
    _steps(model, opt, 3, seed=2)
    _steps(twin, other, 3, seed=2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_flattened_dcp_round_trip_resumes_exactly(name: str) -> None:
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    _resume_matches(
        BUILDERS[name],
        lambda m, o: get_optimizer_state_dict(m, o, options=flat),
        lambda m, o, sd: set_optimizer_state_dict(m, o, sd, options=flat),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("name", ["apollo", "frugal_columns"])
def test_state_holds_tensors_and_numbers_only(name: str) -> None:
    model = _model()
    opt = BUILDERS[name](model)
    _steps(model, opt, 3, seed=1)
    for st in opt.state_dict()["state"].values():
        for key, value in st.items():
            assert isinstance(value, (torch.Tensor, int, float)), (key, value)


def _as_older_checkpoint(sd: dict) -> dict:
    """``sd`` as memopt wrote it before: the seeded shape as a ``proj_shape`` list."""
    sd = copy.deepcopy(sd)
    for st in sd["state"].values():
        if "proj_rows" in st:
            st["proj_shape"] = [st.pop("proj_rows"), st.pop("proj_cols")]
    return sd


@pytest.mark.parametrize("name", ["apollo", "frugal_columns", "frugal_orthogonal"])
def test_older_checkpoints_with_the_list_still_load(name: str) -> None:
    def load(_: nn.Module, o: torch.optim.Optimizer, sd: object) -> None:
        o.load_state_dict(sd)  # type: ignore[arg-type]
        for st in o.state.values():  # loaded in today's form
            assert "proj_shape" not in st

    _resume_matches(BUILDERS[name], lambda _, o: _as_older_checkpoint(o.state_dict()), load)


def test_an_older_checkpoint_of_another_shape_is_refused() -> None:
    model = _model()
    opt = BUILDERS["apollo"](model)
    _steps(model, opt, 1, seed=1)
    sd = _as_older_checkpoint(opt.state_dict())
    sd["state"][0]["proj_shape"] = [96, 65]
    with pytest.raises(ValueError, match=r"built for a 96x65 matrix.*nothing was loaded"):
        BUILDERS["apollo"](copy.deepcopy(model)).load_state_dict(sd)
