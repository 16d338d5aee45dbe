"""A rank above min(m, n) with an SVD-based projector (``svd``, ``rsvd``, ``subspace``).

An m x n matrix has min(m, n) singular vectors, so these projectors store a basis and moments
of rank min(m, n) whatever rank was asked for. When the projected side was the larger one
(``right`` on a wide matrix, ``left`` on a tall one, ``reverse_std`` on either) the rank used
to be clamped to that side only: training ran on (m, min(m, n)) moments while the load check
expected (m, rank), so the optimizer could not load its own state_dict (the error blamed the
checkpoint), and nothing warned about the clamp. The cases are the failures of sweep 35's
shape matrix (fp32), over the three projectors.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import memopt.optim as mo
from memopt._utils.logging import _reset_warn_once
from memopt.memory import optstate
from memopt.memory.model import ParamInfo
from tests.optim._roundtrip import reload

# (shape, proj_type) that failed to resume with rank 4 (sweep 35, shapes_fp32.out)
FAILED = [
    ((8, 1), "reverse_std"),
    ((1, 8), "reverse_std"),
    ((2, 3, 4, 5), "reverse_std"),
    ((3, 200), "reverse_std"),
    ((200, 3), "reverse_std"),
    ((8, 1), "left"),
    ((200, 3), "left"),
    ((1, 8), "right"),
    ((2, 3, 4, 5), "right"),
    ((3, 200), "right"),
]
FACTOR_PROJ = ("svd", "rsvd", "subspace")
GAP, FIRST, THEN = 2, 5, 4  # refreshes before and after the save


def _grad(shape: tuple[int, ...], step: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + step))


def _run(p: torch.nn.Parameter, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    for s in range(start, start + steps):
        p.grad = _grad(tuple(p.shape), s)
        opt.step()


def _resume_is_exact(cls: type, group: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """Train, round-trip through torch.save/load(weights_only), train on both: bit-exact.
    Returns the trained state of the uninterrupted optimizer."""

    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return cls([{"params": params, "update_proj_gap": GAP, **group}], lr=1e-2, weight_decay=0.1)

    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    opt = make([p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the clamp warning: tested below)
        _run(p, opt, 0, FIRST)
        (p2,), opt2 = reload([p], opt, make)
        _run(p, opt, FIRST, THEN)
        _run(p2, opt2, FIRST, THEN)
    assert torch.equal(p, p2), f"{cls.__name__} {group} {shape}: the resumed run differs"
    return opt.state[p]


@pytest.mark.parametrize("proj", FACTOR_PROJ)
@pytest.mark.parametrize(("shape", "proj_type"), FAILED, ids=[f"{s}-{t}" for s, t in FAILED])
def test_galore_rank_above_min_side_resumes(shape, proj_type, proj) -> None:
    st = _resume_is_exact(mo.GaLoreAdamW, {"rank": 4, "proj": proj, "proj_type": proj_type}, shape)
    m = shape[0]
    n = int(torch.tensor(shape[1:]).prod())
    e = min(m, n, 4)
    right = st["proj_right"]
    assert tuple(st["exp_avg"].shape) == ((m, e) if right else (e, n))
    assert tuple(st["proj_P"].shape) == ((e, n) if right else (m, e))


@pytest.mark.parametrize(
    ("cls", "group"),
    [
        (mo.ApolloAdamW, {"rank": 4, "proj": "svd", "proj_type": "right"}),
        (mo.NaturalGaLoreAdamW, {"rank": 4, "proj_type": "right"}),
        (mo.FrugalAdamW, {"rank": 4, "proj_type": "right"}),
        (mo.FrugalAdamW, {"density": 0.9, "proj": "svd", "proj_type": "right"}),
        (mo.GaLoreAdamW, {"rank": 4, "proj_type": "right", "moments": "rotate"}),
        (mo.GaLoreAdamW, {"rank": 300, "proj_type": "reverse_std", "stagger": True}),
    ],
    ids=["apollo", "natural", "frugal-rank", "frugal-density", "rotate", "rank300"],
)
def test_other_optimizers_resume(cls, group) -> None:
    """APOLLO with an SVD basis, Natural GaLore and FRUGAL share the projectors: a 3 x 200
    matrix projected on its 200 side keeps 3 directions, and resumes."""
    st = _resume_is_exact(cls, group, (3, 200))
    assert tuple(st["exp_avg"].shape) == (3, 3)


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("galore", {"rank": 4, "proj": "rsvd", "proj_type": "right"}),
        ("galore", {"rank": 300, "proj": "subspace", "proj_type": "left"}),
        ("frugal", {"density": 0.9, "proj": "svd", "proj_type": "reverse_std"}),
    ],
)
@pytest.mark.parametrize("shape", [(3, 200), (200, 3)])
def test_memory_rule_equals_state_bytes(name, group, shape) -> None:
    """memopt.memory's byte rule, the optimizer's state and its load check agree."""
    cls = {"galore": mo.GaLoreAdamW, "frugal": mo.FrugalAdamW}[name]
    p = torch.nn.Parameter(torch.randn(shape))
    opt = cls([{"params": [p], **group}], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(p, opt, 0, 1)
        expected = opt.expected_moment_shape(p, opt.param_groups[0])
    info = ParamInfo("w", shape, torch.float32, True)
    saved, _ = optstate.state_rule([info], name, group)(info, None)
    assert saved == mo.state_bytes(opt).total
    assert tuple(opt.state[p]["exp_avg"].shape) == expected


def test_clamp_to_min_side_warns() -> None:
    """A 64-channel 3x3 conv (64 x 576) with rank 128 on its 576 side: 64 singular vectors."""
    _reset_warn_once()
    p = torch.nn.Parameter(torch.randn(64, 64, 3, 3))
    opt = mo.GaLoreAdamW([{"params": [p], "rank": 128, "proj_type": "right"}], lr=1e-3)
    p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match=r"rank 128 is above min\(m, n\) = 64 of a 64x576 .*"
                                         r"clamped to 64$"):  # fmt: skip
        opt.step()
    assert tuple(opt.state[p]["exp_avg"].shape) == (64, 64)


def test_density_clamp_warns() -> None:
    _reset_warn_once()
    p = torch.nn.Parameter(torch.randn(3, 200))
    group = {"params": [p], "density": 0.9, "proj": "svd", "proj_type": "right"}
    opt = mo.FrugalAdamW([group], lr=1e-3)
    p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match=r"density 0.9 \(180 directions\) .* clamped to 3$"):
        opt.step()


def test_no_clamp_no_warning() -> None:
    """Rank = min(m, n) below the projected side is no clamp (and a memory saving): silent."""
    _reset_warn_once()
    p = torch.nn.Parameter(torch.randn(64, 576))
    opt = mo.GaLoreAdamW([{"params": [p], "rank": 64, "proj_type": "right"}], lr=1e-3)
    p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert tuple(opt.state[p]["exp_avg"].shape) == (64, 64)


@pytest.mark.parametrize("proj", ["gram", "random", "orthogonal"])
def test_other_projectors_keep_their_format(proj) -> None:
    """Projectors that do not cut singular factors keep r directions of the projected side
    (gram: r eigenvectors of the n x n Gram matrix): their stored shapes, and so checkpoints
    written before this change, stay as they were."""
    st = _resume_is_exact(mo.GaLoreAdamW, {"rank": 4, "proj": proj, "proj_type": "right"}, (3, 200))
    assert tuple(st["exp_avg"].shape) == (3, 4)
