"""Every optimizer resumes bit-exactly from a weights_only state_dict."""

from __future__ import annotations

import io

import pytest
import torch

from memopt.optim import (
    ApolloAdamW,
    ApolloMini,
    FrugalAdamW,
    GaLoreAdamW,
    NaturalGaLoreAdamW,
)

CASES = {
    "galore-svd": (GaLoreAdamW, {"rank": 3, "update_proj_gap": 3}),
    "galore-rsvd-stagger": (
        GaLoreAdamW,
        {"rank": 3, "update_proj_gap": 3, "proj": "rsvd", "stagger": True},
    ),
    "galore-subspace-rotate": (
        GaLoreAdamW,
        {"rank": 3, "update_proj_gap": 2, "proj": "subspace", "moments": "rotate"},
    ),
    "galore-gram": (GaLoreAdamW, {"rank": 3, "update_proj_gap": 3, "proj": "gram"}),
    "galore-full": (GaLoreAdamW, {"rank": 3, "update_proj_gap": 3, "proj_type": "full"}),
    "galore-bf16-matmul": (
        GaLoreAdamW,
        {"rank": 3, "update_proj_gap": 3, "proj": "rsvd", "matmul_dtype": "bfloat16"},
    ),
    "apollo-bf16-matmul": (
        ApolloAdamW,
        {"rank": 3, "update_proj_gap": 3, "matmul_dtype": "bfloat16"},
    ),
    "apollo": (ApolloAdamW, {"rank": 3, "update_proj_gap": 3}),
    "apollo-mini": (ApolloMini, {"rank": 1, "update_proj_gap": 3}),
    "frugal-svd": (FrugalAdamW, {"density": 0.25, "update_proj_gap": 3}),
    "frugal-orthogonal": (
        FrugalAdamW,
        {"density": 0.25, "update_proj_gap": 3, "proj": "orthogonal"},
    ),
    "frugal-columns": (FrugalAdamW, {"density": 0.25, "update_proj_gap": 3, "proj": "columns"}),
    "frugal-coordinate": (
        FrugalAdamW,
        {"density": 0.25, "update_proj_gap": 3, "proj": "coordinate"},
    ),
    "frugal-block-random": (
        FrugalAdamW,
        {"density": 0.5, "update_proj_gap": 2, "proj": "block", "block_order": "random"},
    ),
    "natural-galore": (NaturalGaLoreAdamW, {"rank": 3, "update_proj_gap": 3}),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Conv1d(1, 1, 1)
    )


def _opt(cls, model, options, dtype_opts):
    mats = [p for p in model.parameters() if p.dim() >= 2 and p.shape[0] > 1]
    rest = [p for p in model.parameters() if all(p is not q for q in mats)]
    return cls(
        [{"params": mats, **options}, {"params": rest}], lr=1e-2, weight_decay=0.01, **dtype_opts
    )


def _train(model, opt, steps, start):
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(s)
        x = torch.randn(4, 12, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model[:3](x).square().mean().backward()
        for p in model.parameters():  # the conv gets a synthetic gradient
            if p.grad is None:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("precision", ["fp32", "bf16-fp32-state"])
def test_k_steps_save_load_equals_n_steps(case, precision):
    cls, options = CASES[case]
    dtype_opts = {"state_dtype": "float32"} if precision != "fp32" else {}
    n, k = 9, 4

    def fresh():
        m = _model()
        if precision != "fp32":
            m = m.to(torch.bfloat16)
        return m

    ref_model = fresh()
    _train(ref_model, _opt(cls, ref_model, options, dtype_opts), n, 0)

    model = fresh()
    opt = _opt(cls, model, options, dtype_opts)
    _train(model, opt, k, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    blob = torch.load(buf, weights_only=True)  # no pickled objects in optimizer state

    model2 = fresh()
    model2.load_state_dict(blob["model"])
    opt2 = _opt(cls, model2, options, dtype_opts)
    opt2.load_state_dict(blob["opt"])
    _train(model2, opt2, n - k, k)
    for a, b in zip(ref_model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b), case
    if precision != "fp32":
        moments = [st["exp_avg"] for st in opt2.state.values() if "exp_avg" in st]
        assert moments and all(m.dtype == torch.float32 for m in moments)


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10),
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-3, 1e-2, step_size_up=2),
        lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=1e-3),
    ],
    ids=["onecycle", "cyclic", "swalr"],
)
def test_state_dict_under_schedulers_that_add_group_keys_loads(make_sched):
    """OneCycleLR / CyclicLR / SWALR write keys into every group; the optimizer refused its
    own state dict afterwards (unknown param-group option(s) ['base_momentum', ...])."""
    def build():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 6))
        opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}], lr=1e-3)
        return w, opt, make_sched(opt)

    w, opt, sched = build()
    for _ in range(3):
        w.grad = torch.ones_like(w)
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    w2, opt2, sched2 = build()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    w2.data.copy_(w.data)
    for o, p, s in ((opt, w, sched), (opt2, w2, sched2)):
        p.grad = torch.ones_like(p)
        o.step()
        s.step()
    assert torch.equal(w, w2)
