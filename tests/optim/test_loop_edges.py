"""What training loops do around an optimizer: copy it (deepcopy, pickle), call its step
inside ``torch.autocast`` or a ``torch.compile``d function, hand it channels_last conv
weights. A copy used to lose memopt's own settings (the seed, APOLLO's options) and crash on
its first step; under autocast the projection GEMMs ran in low precision and made fp16
moments for fp32 weights (GaLore 9x, FRUGAL 145x too far); Dynamo failed inside the step;
APOLLO and FRUGAL crashed on a weight with no 2-D view."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import memopt.optim as mo
from tests.optim._roundtrip import reload
from tests.optim.test_param_dtypes import BUILDERS


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))


def _grads(model: nn.Module, seed: int) -> None:
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_copies_step_like_the_original(name: str) -> None:
    warnings.simplefilter("ignore")
    model = _model()
    opt = BUILDERS[name](model, lr=1e-3)
    for s in range(4):  # past a refresh (gap 3)
        _grads(model, s)
        opt.step()
    buf = io.BytesIO()
    pickle.dump(opt, buf)
    copies = [copy.deepcopy(opt), pickle.loads(buf.getvalue())]
    _grads(model, 9)
    for other in copies:
        for p, q in zip(_params(opt), _params(other), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
    opt.step()
    for other in copies:
        other.step()
        for p, q in zip(_params(opt), _params(other), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["galore svd", "apollo", "frugal svd", "natural galore"])
@pytest.mark.parametrize("state_dtype", [None, "float32"])
def test_step_inside_autocast_equals_outside(name: str, state_dtype: str | None) -> None:
    warnings.simplefilter("ignore")
    kw = {"lr": 1e-3} if state_dtype is None else {"lr": 1e-3, "state_dtype": state_dtype}
    out = []
    for inside in (False, True):
        model = _model()
        opt = BUILDERS[name](model, **kw)
        for s in range(4):
            _grads(model, s)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
        moments = [v for st in opt.state.values() for k, v in st.items() if k == "exp_avg"]
        assert moments and all(m.dtype == torch.float32 for m in moments)
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


CONV = {"galore": mo.GaLoreAdamW, "apollo": mo.ApolloAdamW, "apollo-mini": mo.ApolloMini,
        "frugal": mo.FrugalAdamW}  # fmt: skip
LOW: dict[str, dict[str, object]] = {
    "galore": {"rank": 2}, "apollo": {"rank": 2}, "apollo-mini": {"rank": 1},
    "frugal": {"density": 0.25},
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONV))
def test_channels_last_conv_weight_steps_like_a_contiguous_one(name: str) -> None:
    """A channels_last conv weight has no 2-D view: APOLLO and FRUGAL crashed on .view; the
    update now goes through a matrix copy written back, equal (same gradients) to the
    contiguous case."""
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    w0 = torch.randn(16, 8, 3, 3)
    grads = [torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    out = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        w = nn.Parameter(w0.clone().to(memory_format=fmt))
        opt = CONV[name]([{"params": [w], **LOW[name], "update_proj_gap": 3}], lr=1e-3)
        for g in grads:
            w.grad = g.clone().to(memory_format=fmt)
            opt.step()
        assert w.is_contiguous(memory_format=fmt)
        out.append(w.detach().contiguous())
    assert torch.equal(out[0], out[1])


def test_compiled_training_step_runs_the_update_eagerly() -> None:
    """torch.compile of a step function that calls opt.step(): Dynamo failed inside memopt's
    bookkeeping; the step is now a graph break and runs eagerly, bit for bit."""
    torch.manual_seed(0)
    lin, ref = nn.Linear(32, 32), nn.Linear(32, 32)
    ref.load_state_dict(lin.state_dict())

    def make(m: nn.Linear) -> torch.optim.Optimizer:
        return mo.GaLoreAdamW([{"params": [m.weight], "rank": 4}, {"params": [m.bias]}], lr=1e-3)

    opt, ref_opt = make(lin), make(ref)

    @torch.compile
    def train_step(x: torch.Tensor) -> torch.Tensor:
        loss = lin(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    for s in range(3):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(s))
        train_step(x)
        ref(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert torch.equal(lin.weight, ref.weight)


@pytest.mark.parametrize("name", ["adamw", "galore svd"])
def test_load_state_dict_pre_hook_result_is_what_loads(name: str) -> None:
    """A load pre-hook that returns a new dict (torch's documented contract): memopt read the
    original before the hooks ran and loaded its tensors."""
    warnings.simplefilter("ignore")
    model = _model()
    opt = BUILDERS[name](model, lr=1e-3)
    for s in range(2):
        _grads(model, s)
        opt.step()
    saved = opt.state_dict()

    def zero_moments(_opt: torch.optim.Optimizer, sd: dict) -> dict:
        sd = copy.deepcopy(sd)
        for st in sd["state"].values():
            st["exp_avg"] = torch.zeros_like(st["exp_avg"])
        return sd

    fresh = BUILDERS[name](_model(), lr=1e-3)
    fresh.register_load_state_dict_pre_hook(zero_moments)
    fresh.load_state_dict(saved)
    assert all(bool((st["exp_avg"] == 0).all()) for st in fresh.state.values())
    assert len(fresh._optimizer_load_state_dict_pre_hooks) == 1  # still registered


EMPTY_CASES = {
    "galore": (mo.GaLoreAdamW, {"rank": 4}),
    "galore full": (mo.GaLoreAdamW, {"rank": 4, "proj_type": "full"}),
    "apollo": (mo.ApolloAdamW, {"rank": 4}),
    "natural galore": (mo.NaturalGaLoreAdamW, {"rank": 4}),
    "frugal svd": (mo.FrugalAdamW, {"density": 0.5}),
    "frugal columns": (mo.FrugalAdamW, {"density": 0.5, "proj": "columns"}),
    "frugal orthogonal": (mo.FrugalAdamW, {"density": 0.5, "proj": "orthogonal"}),
    "frugal coordinate": (mo.FrugalAdamW, {"density": 0.5, "proj": "coordinate"}),
}


@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_empty_parameters_in_low_rank_groups_step_and_reload(name: str) -> None:
    # (0, 16) reloaded with a rank-1 shape (density clamped up from 0), and (0, 0, 3) failed
    # to reshape at the first step; the non-empty matrix beside them must train as alone.
    cls, opts = EMPTY_CASES[name]
    shapes = [(16, 16), (0, 16), (16, 0), (0, 0, 3), (2, 0, 3)]

    def run(with_empty: bool) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s)) for s in shapes[: None if with_empty else 1]]
        opt = cls([{"params": ps, "update_proj_gap": 2, **opts}], lr=1e-2)
        for k in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k))
            opt.step()
        return opt, ps

    opt, ps = run(True)
    _, alone = run(False)
    assert torch.equal(ps[0], alone[0])
    _, opt2 = reload(ps, opt, lambda params: cls([{"params": params, "update_proj_gap": 2,
                                                   **opts}], lr=1e-2))  # fmt: skip
    assert len(opt2.state) == len(shapes)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_full_adam_reads_any_gradient_layout(layout: str, state_dtype: str | None) -> None:
    # torch's fused kernel (memopt's full-state path) reads every tensor's storage as if laid
    # out like the parameter: a hand-set transposed/strided/expanded gradient was misread
    shape = {"transposed": lambda g: g.t().contiguous().t(),
             "strided": lambda g: torch.cat([g, g], 1)[:, ::2],
             "expanded": lambda g: g[:1].expand(64, 32)}[layout]  # fmt: skip
    grads = [torch.randn(64, 32, generator=torch.Generator().manual_seed(k)) for k in range(3)]

    def run(odd: bool) -> torch.Tensor:
        p = nn.Parameter(torch.ones(64, 32))
        opt = mo.AdamW([p], lr=1e-2, state_dtype=state_dtype)
        for g in grads:
            p.grad = shape(g) if odd else shape(g).contiguous()
            opt.step()
        return p.detach()

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=1e-6)


def test_full_adam_on_a_strided_view_parameter_leaves_the_rest_of_its_base() -> None:
    base = torch.zeros(16, 8)
    p = nn.Parameter(base[:, ::2])  # shares base's storage; its gradient is contiguous
    ref = nn.Parameter(torch.zeros(16, 4))
    opts = [mo.AdamW([p], lr=1e-2), torch.optim.AdamW([ref], lr=1e-2, foreach=False)]
    for k in range(3):
        g = torch.randn(16, 4, generator=torch.Generator().manual_seed(k))
        p.grad, ref.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-7)
    assert torch.equal(base[:, 1::2], torch.zeros(16, 4))  # the fused kernel wrote these


@pytest.mark.parametrize("cls", [mo.ApolloAdamW, mo.ApolloMini])
def test_apollo_takes_an_expanded_gradient_on_every_path(cls, monkeypatch) -> None:
    # the native channel-norm pass refused a row stride of 0 that the torch path takes
    def run(kernels: str, expanded: bool) -> torch.Tensor:
        monkeypatch.setenv("MEMOPT_KERNELS", kernels)
        p = nn.Parameter(torch.ones(64, 32))
        group = {"params": [p], "rank": 1 if cls is mo.ApolloMini else 4, "update_proj_gap": 2}
        opt = cls([group], lr=1e-2)
        for k in range(2):
            row = torch.randn(1, 32, generator=torch.Generator().manual_seed(k))
            p.grad = row.expand(64, 32) if expanded else row.expand(64, 32).contiguous()
            opt.step()
        return p.detach()

    want = run("torch", False)
    for kernels in ("torch", "auto"):
        torch.testing.assert_close(run(kernels, True), want, rtol=1e-6, atol=1e-7)
