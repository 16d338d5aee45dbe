"""Group options: APOLLO-Mini is rank 1, and param_groups names an unknown option (with the
closest known one) instead of reporting a missing rank or passing the typo into the group."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import memopt.optim as mo
from memopt.config.build import build_optimizer
from memopt.config.sections import OptimizerConfig

LOW_RANK = (mo.GaLoreAdamW, mo.NaturalGaLoreAdamW, mo.ApolloAdamW, mo.ApolloMini, mo.FrugalAdamW)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.LayerNorm(24), nn.Linear(24, 8))


@pytest.mark.parametrize("rank", [2, 4, 0])
def test_apollo_mini_refuses_another_rank(rank: int) -> None:
    p = nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=rf"ApolloMini: rank={rank}, but APOLLO-Mini is rank=1"
                       r".*ApolloAdamW with that rank and scale_type='tensor'"):  # fmt: skip
        mo.ApolloMini([{"params": [p], "rank": rank}])
    opt = mo.ApolloMini([{"params": [p], "rank": 1}])  # a later group: nothing half-added
    q = nn.Parameter(torch.randn(8, 24))
    with pytest.raises(ValueError, match=f"rank={rank}"):
        opt.add_param_group({"params": [q], "rank": rank})
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["rank"] == 1 and opt.param_groups[0]["scale_type"] == "tensor"


def test_apollo_mini_default_rank_paths_still_build() -> None:
    """Every memopt path that builds APOLLO-Mini without a rank uses rank 1."""
    opt = build_optimizer(_model(), OptimizerConfig(name="apollo_mini", target="0|2"))
    assert type(opt) is mo.ApolloMini
    assert [g["rank"] for g in opt.param_groups if "rank" in g] == [1]
    mini = mo.ApolloMini(mo.apollo.mini_groups(_model().parameters()))
    assert [g.get("rank") for g in mini.param_groups] == [1, None]


def test_apollo_mini_refuses_to_load_another_rank() -> None:
    """An ApolloMini state dict whose group has rank 4 (as one built before rank 1 was
    enforced) would switch the optimizer to rank 4 on load (no state yet: no shape check)."""
    model = _model()
    mini = mo.ApolloMini(mo.param_groups(model, target="0|2", rank=1))
    saved = mini.state_dict()
    saved["param_groups"][0]["rank"] = 4
    with pytest.raises(ValueError, match=r"ApolloMini.load_state_dict \(group 0, nothing was "
                       r"loaded\): rank=4, but APOLLO-Mini is rank=1"):  # fmt: skip
        mini.load_state_dict(saved)
    assert mini.param_groups[0]["rank"] == 1
    mini.load_state_dict(mo.ApolloMini(mo.param_groups(model, target="0|2", rank=1)).state_dict())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rnak": 2}, r"param_groups: unknown param-group option\(s\) \['rnak'\] \(did you mean "
                      r"'rank' for 'rnak'\?\); supported: \[.*'rank'"),
        ({"rank": 4, "scael": 0.5}, r"\['scael'\] \(did you mean 'scale' for 'scael'\?\)"),
        ({"density": 0.5, "densty_order": 1}, r"\['densty_order'\]"),
        ({"rank": 4, "foo": 1}, r"\['foo'\]; supported"),  # nothing close: no suggestion
    ],
)
def test_param_groups_names_unknown_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mo.param_groups(_model(), target="0|2", **options)


@pytest.mark.parametrize("key", ["params", "param_names"])
def test_param_groups_refuses_to_overwrite_its_own_keys(key: str) -> None:
    with pytest.raises(ValueError, match=rf"\['{key}'\] are filled in by param_groups itself"):
        mo.param_groups(_model(), target="0|2", rank=2, **{key: []})


def _options(cls: type) -> list[tuple[type, str, Any]]:
    own = {**cls.base_defaults, **cls.low_rank_defaults}
    return [(cls, k, v) for k, v in own.items() if k not in ("state_free", "weight_decay")]


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [c for cls in LOW_RANK for c in _options(cls)],
    ids=str,
)
def test_param_groups_passes_every_optimizer_option(cls: type, key: str, value: Any) -> None:
    """Each option of each low-rank optimizer (torch's lr / betas / eps among them) reaches
    the group and the optimizer takes it; so does a key an LR scheduler adds."""
    size = {"density": 0.5} if cls is mo.FrugalAdamW else {"rank": 1}
    groups = mo.param_groups(_model(), target="0|2", initial_lr=1e-3, **size, **{key: value})
    assert groups[0][key] == value and groups[0]["initial_lr"] == 1e-3
    opt = cls(groups)
    assert opt.param_groups[0][key] == value


def test_optimizer_suggests_the_close_option() -> None:
    p = nn.Parameter(torch.randn(8, 8))
    match = r"GaLoreAdamW: unknown param-group option\(s\) \['scael'\] \(did you mean 'scale'"
    with pytest.raises(ValueError, match=match + r" for 'scael'\?\); supported"):
        mo.GaLoreAdamW([{"params": [p], "rank": 2, "scael": 0.5}])
    with pytest.raises(ValueError, match=r"AdamW: unknown param-group option\(s\) \['rank'\]"
                       r"; supported"):  # fmt: skip
        mo.AdamW([{"params": [p], "rank": 2}])  # no close AdamW option: no suggestion
