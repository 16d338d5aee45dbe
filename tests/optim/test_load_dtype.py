"""A state dict saved under one precision setup loads into another and steps: each float
state tensor takes the dtype the loading optimizer builds it in (as torch's own load casts
state to the parameter's dtype). fp32 parameters stand in for fp32 master weights of a
bf16 model (``memopt.shard(master_dtype=torch.float32)``), whose state is the same."""

from __future__ import annotations

import io

import pytest
import torch

from memopt.optim import AdamW, ApolloAdamW, FrugalAdamW, GaLoreAdamW, NaturalGaLoreAdamW

CASES = {
    "adamw": (AdamW, {}),
    "adamw-int8": (AdamW, {"state_dtype": "int8"}),
    "galore": (GaLoreAdamW, {"rank": 3, "update_proj_gap": 2}),
    "galore-full": (GaLoreAdamW, {"rank": 3, "update_proj_gap": 2, "proj_type": "full"}),
    "natural-galore": (NaturalGaLoreAdamW, {"rank": 3, "update_proj_gap": 2}),
    "apollo": (ApolloAdamW, {"rank": 3, "update_proj_gap": 2}),
    "frugal-svd": (FrugalAdamW, {"density": 0.25, "update_proj_gap": 2}),
}
DIRECTIONS = {"fp32-to-bf16": (torch.float32, torch.bfloat16),
              "bf16-to-fp32": (torch.bfloat16, torch.float32)}  # fmt: skip


def _params(dtype):
    torch.manual_seed(0)  # a 64x64 matrix: 4096 elements, quantized under int8
    shapes = [(64, 64), (16, 12), (16,)]
    return [torch.nn.Parameter(torch.randn(s).div_(4).to(dtype)) for s in shapes]


def _opt(cls, params, options):
    kwargs = {k: v for k, v in options.items() if k == "state_dtype"}
    group = {k: v for k, v in options.items() if k != "state_dtype"}
    return cls([{"params": params[:2], **group}, {"params": params[2:]}], lr=1e-2, **kwargs)


def _train(params, opt, steps, start):
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _saved(cls, options, dtype):
    params = _params(dtype)
    opt = _opt(cls, params, options)
    _train(params, opt, 3, 0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return params, torch.load(buf, weights_only=True)


def _float_state(opt):
    return [{k: v for k, v in st.items() if torch.is_tensor(v) and v.is_floating_point()}
            for st in opt.state.values()]  # fmt: skip


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_saved_under_another_dtype_loads_and_steps(case, direction):
    cls, options = CASES[case]
    src, dst = DIRECTIONS[direction]
    params, sd = _saved(cls, options, src)
    native = _params(dst)  # what an optimizer on dst parameters builds
    native_opt = _opt(cls, native, options)
    _train(native, native_opt, 3, 0)

    target = [torch.nn.Parameter(p.detach().to(dst)) for p in params]
    opt = _opt(cls, target, options)
    opt.load_state_dict(sd)
    loaded, built = _float_state(opt), _float_state(native_opt)
    assert len(loaded) == len(built) == len(sd["state"])
    for got, want, saved in zip(loaded, built, sd["state"].values(), strict=True):
        for key, v in got.items():
            assert v.dtype == want[key].dtype, (case, key)
            if key in saved:  # (not a seeded projector's cache, rebuilt on load): the saved
                # values, rounded to bf16 where the target keeps bf16 (exact to fp32)
                assert torch.equal(v, saved[key].to(v.dtype)), (case, key)
    _train(target, opt, 3, 3)  # failed inside torch before: mixed-dtype matmul / fused Adam
    assert all(torch.isfinite(p).all() for p in target)


def test_same_dtype_load_keeps_the_saved_tensors_bit_exact():
    params, sd = _saved(GaLoreAdamW, {"rank": 3, "update_proj_gap": 2}, torch.bfloat16)
    opt = _opt(GaLoreAdamW, params, {"rank": 3, "update_proj_gap": 2})
    opt.load_state_dict(sd)
    for st, saved in zip(_float_state(opt), sd["state"].values(), strict=True):
        for key, v in st.items():
            assert v.dtype == saved[key].dtype and torch.equal(v, saved[key]), key


def test_float_state_of_unknown_dtype_is_refused_and_nothing_loads():
    params, sd = _saved(GaLoreAdamW, {"rank": 3, "update_proj_gap": 2}, torch.float32)
    first = next(iter(sd["state"]))
    sd["state"][first]["extra_buffer"] = torch.zeros(3)  # a key memopt does not build
    target = [torch.nn.Parameter(p.detach().bfloat16()) for p in params]
    opt = _opt(GaLoreAdamW, target, {"rank": 3, "update_proj_gap": 2})
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    msg = str(err.value)
    for part in ("group 0 param 0", "'extra_buffer'", "torch.float32", "torch.bfloat16",
                 "nothing was loaded"):  # fmt: skip
        assert part in msg
    assert len(opt.state) == 0
