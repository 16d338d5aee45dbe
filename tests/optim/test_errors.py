"""Bad input gets a clear error naming the value and the fix; never a silent no-op."""

from __future__ import annotations

import pytest
import torch

from memopt.optim import ApolloAdamW, FrugalAdamW, GaLoreAdamW, NaturalGaLoreAdamW


def _p(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        GaLoreAdamW([{"params": [_p(4, 4)], "rank": rank}])


def test_unknown_group_key_lists_supported():
    with pytest.raises(ValueError, match=r"unknown param-group option\(s\) \['rnak'\].*rank"):
        GaLoreAdamW([{"params": [_p(4, 4)], "rnak": 2}])


def test_unknown_projector_lists_known():
    with pytest.raises(ValueError, match="unknown proj 'svdd'.*rsvd"):
        GaLoreAdamW([{"params": [_p(4, 4)], "rank": 2, "proj": "svdd"}])


def test_unknown_proj_type():
    with pytest.raises(ValueError, match="unknown proj_type 'middle'"):
        ApolloAdamW([{"params": [_p(4, 4)], "rank": 2, "proj_type": "middle"}])


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"moments": "forget"}, "moments"),
        ({"scale": -1.0}, "scale"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"state_dtype": "float16"}, "state_dtype"),
        ({"natural_history": 0}, "natural_history"),
        # nan passes "x < 0" checks; torch refuses it, and one step made every weight nan
        ({"eps": float("nan")}, "eps must be a finite number >= 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
        ({"scale": float("nan")}, "scale must be a finite number > 0"),
        ({"scale": float("inf")}, "scale must be a finite number > 0"),
        ({"damping": float("nan")}, "damping must be a finite number > 0"),
        ({"betas": (0.9, float("nan"))}, "betas"),
    ],
)
def test_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        NaturalGaLoreAdamW([{"params": [_p(4, 4)], "rank": 2, **bad}])


def test_failed_group_is_not_half_added():
    opt = GaLoreAdamW([{"params": [_p(4, 4)], "rank": 2}])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_p(3, 3)], "rank": -1})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    ("cls", "bad", "match"),
    [
        (FrugalAdamW, {"inactive_lr_scale": float("nan")}, "inactive_lr_scale must be a finite"),
        (FrugalAdamW, {"inactive_lr_scale": -1.0}, "inactive_lr_scale must be a finite"),
        (FrugalAdamW, {"proj_params_lr_scale": -1.0}, "proj_params_lr_scale must be a finite"),
        (ApolloAdamW, {"nl_gamma": float("nan")}, "nl_gamma must be a finite number >= 1"),
    ],
)
def test_bad_optimizer_specific_values(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls([{"params": [_p(4, 4)], "rank": 2, **bad}])


@pytest.mark.parametrize(
    ("bad", "match"),
    [({"correct_bias": "false"}, "correct_bias must be True or False"),
     ({"stagger": "no"}, "stagger must be True or False"),
     ({"density": True}, "density must be a number")],
)  # fmt: skip
def test_strings_and_bools_are_not_truthy_options(bad, match):
    # "false" is a truthy string: it switched the feature on
    with pytest.raises((TypeError, ValueError), match=match):
        GaLoreAdamW([{"params": [_p(4, 4)], "update_proj_gap": 2, "rank": 2, **bad}])


def test_numpy_scalars_are_taken_as_python_numbers():
    np = pytest.importorskip("numpy")
    opt = GaLoreAdamW([{"params": [_p(4, 4)], "rank": np.int64(2),
                        "update_proj_gap": np.int64(3)}], lr=np.float32(1e-3))  # fmt: skip
    group = opt.param_groups[0]
    assert type(group["lr"]) is float and type(group["rank"]) is int
    assert type(group["update_proj_gap"]) is int and group["lr"] == pytest.approx(1e-3)


def test_sparse_gradient():
    p = _p(4, 4)
    opt = GaLoreAdamW([{"params": [p], "rank": 2}])
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls", [GaLoreAdamW, ApolloAdamW, FrugalAdamW, NaturalGaLoreAdamW])
def test_sparse_gradient_refused_before_any_parameter_changes(cls):
    # the low-rank group comes first: it was updated before the embedding's gradient raised
    w, e = _p(8, 8), _p(10, 8)
    opt = cls([{"params": [w], "rank": 2}, {"params": [e]}], lr=0.1)
    w.grad, e.grad = torch.randn(8, 8), torch.randn(10, 8).to_sparse()
    before = w.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(w, before) and not opt.state


def test_complex_gradient():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    opt = GaLoreAdamW([{"params": [p], "rank": 2}])
    p.grad = torch.randn(4, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        opt.step()


@pytest.mark.parametrize(
    ("cls", "opts"),
    [(GaLoreAdamW, {"rank": 2}), (ApolloAdamW, {"rank": 2}), (FrugalAdamW, {"density": 0.5})],
)
def test_parameter_left_on_meta_is_named(cls, opts):
    # (a model built under torch.device("meta") and never materialised: torch.item() errors)
    with torch.device("meta"):
        lin = torch.nn.Linear(8, 8)
    opt = cls([{"params": [lin.weight], "param_names": ["lin.weight"], **opts}])
    lin.weight.grad = torch.zeros_like(lin.weight)
    with pytest.raises(RuntimeError, match=r"lin.weight is on the meta device.*to_empty"):
        opt.step()


@pytest.mark.parametrize("proj", ["svd", "rsvd", "subspace"])
def test_non_finite_gradient_at_refresh_names_the_parameter(proj):
    p = _p(8, 4)
    opt = GaLoreAdamW(
        [{"params": [p], "param_names": ["blocks.0.attn.q"], "rank": 2, "proj": proj}]
    )
    p.grad = torch.full((8, 4), float("nan"))
    before = p.detach().clone()
    with pytest.raises(FloatingPointError, match=r"blocks\.0\.attn\.q.*non-finite"):
        opt.step()
    assert torch.equal(p.detach(), before)  # nothing was written


def test_frugal_rank_with_density_only_modes():
    with pytest.raises(ValueError, match="needs density"):
        FrugalAdamW([{"params": [_p(4, 4)], "rank": 2, "proj": "coordinate"}])


def test_low_rank_keys_on_adamw_and_density_on_mini_are_refused() -> None:
    """AdamW takes no rank/density (it used to accept them, then fail on update_proj_gap);
    APOLLO-Mini with density= would silently run as plain APOLLO."""
    import memopt.optim as mo

    p = torch.nn.Parameter(torch.randn(64, 32))
    with pytest.raises(ValueError, match=r"unknown param-group option\(s\) \['rank'\]"):
        mo.AdamW([{"params": [p], "rank": 8}])
    with pytest.raises(ValueError, match="APOLLO-Mini is rank=1"):
        mo.ApolloMini([{"params": [p], "density": 0.25}])


def test_tensor_lr_is_refused_with_the_reason() -> None:
    import memopt.optim as mo

    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(TypeError, match="lr is a tensor.*float"):
        mo.AdamW([p], lr=torch.tensor(1e-3))  # type: ignore[arg-type]


def test_state_dict_of_another_optimizer_class_is_refused() -> None:
    """A GaLore state dict loaded into APOLLO or FRUGAL was accepted and failed at the next
    step with a KeyError on a group option; now the load names both classes."""
    import memopt.optim as mo

    p = torch.nn.Parameter(torch.randn(64, 32))
    src = mo.GaLoreAdamW([{"params": [p], "rank": 8}])
    p.grad = torch.randn_like(p)
    src.step()
    sd = src.state_dict()
    assert sd["memopt_optimizer"] == "GaLoreAdamW"
    q = torch.nn.Parameter(torch.randn(64, 32))
    dst = mo.ApolloAdamW([{"params": [q], "rank": 8}])
    with pytest.raises(ValueError, match="saved by GaLoreAdamW.*nothing was loaded"):
        dst.load_state_dict(sd)
    assert not dst.state
    legacy = {k: v for k, v in sd.items() if k != "memopt_optimizer"}  # older checkpoints
    mo.GaLoreAdamW([{"params": [q], "rank": 8}]).load_state_dict(legacy)


@pytest.mark.parametrize(
    ("proj", "options", "match"),
    [("rsvd", {"oversampel": 0}, r"proj_options \['oversampel'\] unknown for proj='rsvd'; it "
                                 r"takes: oversample, power_iters"),
     ("svd", {"oversample": 4}, r"unknown for proj='svd'; it takes: none"),
     ("rsvd", {"oversample": -6}, r"proj_options\['oversample'\] of proj='rsvd' must be an "
                                  r"integer >= 0"),  # it silently made rank 8 into rank 2
     ("subspace", {"iters": 0}, r"proj_options\['iters'\] of proj='subspace' must be an integer"),
     ("rsvd", [("oversample", 2)], "proj_options must be a mapping")],
)  # fmt: skip
def test_bad_proj_options(proj, options, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [_p(8, 8)], "rank": 2, "proj": proj, "proj_options": options}])
    opt = GaLoreAdamW([{"params": [_p(8, 8)], "rank": 2, "proj": "rsvd",
                        "proj_options": {"oversample": 0, "power_iters": 1}}])  # fmt: skip
    assert opt.projector(opt.param_groups[0]).options["oversample"] == 0
