"""apply(): validation errors, remove() restores the model, keep counting, report, compile."""

from __future__ import annotations

import sys

import pytest
import torch

from memopt.activations import ActivationOptions, BlockDecision, Plan, SavedLedger, apply
from memopt.activations.hooks import managed_block
from memopt.activations.install import INSTALLERS
from memopt.activations.policy import keep, recompute, swap
from tests.activations._models import grads, make_stack, same, stack_loss

OPTS = ActivationOptions(min_swap_bytes=1024)


def test_unknown_name_lists_close_names() -> None:
    model = make_stack()
    with pytest.raises(ValueError, match=r"'blocks\.7'.*close names: blocks\.[0-3]"):
        apply(model, {"blocks.7": swap()})
    with pytest.raises(ValueError, match="'blokcs.1' is not a submodule.*blocks.1"):
        apply(model, {"blokcs.1": swap()})
    assert all(managed_block(m) is None for m in model.modules())


def test_nested_blocks_are_an_error() -> None:
    model = make_stack()
    with pytest.raises(ValueError, match=r"'blocks\.0\.fc' lies inside managed block 'blocks\.0'"):
        apply(model, {"blocks.0": swap(), "blocks.0.fc": recompute()})
    with pytest.raises(ValueError, match="lies inside managed block ''"):
        apply(model, {"": keep(), "blocks.1": swap()})
    mgr = apply(model, {"blocks.1": swap()})
    with pytest.raises(ValueError, match="managed by another apply"):
        apply(model, {"blocks.1.norm": recompute()})
    with pytest.raises(ValueError, match="managed by another apply"):
        apply(model, {"": recompute()})
    mgr.remove()
    apply(model, {"blocks.1.norm": recompute()}).remove()


def test_bad_policy_type_and_double_management() -> None:
    model = make_stack()
    with pytest.raises(TypeError, match="ActivationPolicy"):
        apply(model, {"blocks.0": "swapp"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="plan must be a Plan or a mapping"):
        apply(model, "recompute")  # type: ignore[arg-type]
    apply(model, {"blocks.0": "recompute"}).remove()  # the action name, as plan() takes it
    mgr = apply(model, {"blocks.0": swap()})
    with pytest.raises(ValueError, match="already managed"):
        apply(model, {"blocks.1": keep(), "blocks.0": recompute()})
    # the failed apply rolled back what it had installed (blocks.1)
    assert managed_block(model.blocks[1]) is None
    mgr.remove()
    apply(model, {"blocks.0": recompute()}).remove()


def test_missing_installer_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    apply_mod = sys.modules["memopt.activations.apply"]  # the module (its name is the function's)
    monkeypatch.setitem(apply_mod._INSTALLER_MODULES, "split", "memopt.activations._no_such")
    monkeypatch.delitem(INSTALLERS._items, "split", raising=False)
    with pytest.raises(ValueError, match=r"'split' has no installer.*_no_such"):
        apply(make_stack(), {"blocks.0": swap(), "blocks.1": _split()})


def _split():  # type: ignore[no-untyped-def]
    from memopt.activations.policy import split

    return split(0.5)


def test_nvme_policy_needs_a_directory() -> None:
    with pytest.raises(ValueError, match="NVMeConfig"):
        apply(make_stack(), {"blocks.0": swap("nvme")})


def test_remove_restores_forward_and_gradients() -> None:
    model = make_stack()
    x = torch.randn(16, 64)
    ref = grads(model, stack_loss(x))
    plan = {"blocks.0": swap(), "blocks.1": recompute(), "blocks.2": keep()}
    mgr = apply(model, plan, options=OPTS)
    assert all("forward" in model.blocks[i].__dict__ for i in range(3))
    assert same(grads(model, stack_loss(x)), ref)
    state_keys = list(model.state_dict())
    mgr.remove()
    mgr.remove()  # idempotent
    assert all("forward" not in b.__dict__ and managed_block(b) is None for b in model.blocks)
    assert list(model.state_dict()) == state_keys
    assert same(grads(model, stack_loss(x)), ref)
    fresh = make_stack()
    assert same(grads(fresh, stack_loss(x)), ref)


def test_keep_blocks_are_counted_and_report_compares_plan() -> None:
    model = make_stack(depth=2)
    x = torch.randn(32, 64)
    ledger = SavedLedger()
    plan = Plan(
        decisions=(
            BlockDecision("blocks.0", keep(), held_bytes=100_000),
            BlockDecision("blocks.1", swap(), held_bytes=0),
        ),
        budget_bytes=200_000,
        unmanaged_peak_bytes=200_000,
        predicted_peak_bytes=120_000,
        baseline_step_s=0.01,
        predicted_step_s=0.011,
    )
    mgr = apply(model, plan, ledger=ledger, options=OPTS)
    loss = stack_loss(x)(model)
    peaks = ledger.block_peaks("device")
    assert peaks["blocks.0"] > 3 * 32 * 64 * 4  # input, fc out, gelu out, norm stats ...
    assert ledger.current("host") > 0
    loss.backward()
    text = mgr.report(plan)
    assert "blocks.0" in text and "keep" in text and "swap(cpu)" in text
    assert "predicted 0.11 MiB" in text and "measured/predicted" in text
    mgr.remove()


def test_torch_compile_runs_managed_blocks_eagerly() -> None:
    """Managed blocks are excluded from tracing (a graph break each); the rest compiles."""
    torch._dynamo.reset()
    model = make_stack(depth=2)
    x = torch.randn(16, 64)
    ref = grads(model, stack_loss(x))
    mgr = apply(model, {"blocks.0": swap(), "blocks.1": recompute()}, options=OPTS)
    compiled = torch.compile(model, backend="aot_eager")
    assert same(grads(compiled, stack_loss(x)), ref)
    assert mgr.swap.stats["swapped"] > 0, "the swap hooks must have run inside the compiled model"
    mgr.remove()
    torch._dynamo.reset()


def test_tiny_llama_mixed_plan() -> None:
    from tests.activations._models import llama_batch, llama_loss, tiny_llama

    model = tiny_llama(layers=4)
    ids = llama_batch(seq=128)
    ref = grads(model, llama_loss(ids))
    plan = {
        "model.layers.0": swap(),
        "model.layers.1": recompute(("aten.bmm",)),
        "model.layers.2": keep(),
        "model.layers.3": recompute(),
    }
    ledger = SavedLedger()
    mgr = apply(model, plan, ledger=ledger, options=OPTS)
    got = grads(model, llama_loss(ids))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    peaks = ledger.block_peaks("device")
    # keep holds the most; selective holds inputs + bmm outputs; full recompute only inputs
    assert peaks["model.layers.2"] > peaks["model.layers.1"] > peaks["model.layers.3"] > 0
    assert ledger.block_peaks("host")["model.layers.0"] > 0
    assert "recompute[keep aten.bmm]" in mgr.report()
    mgr.remove()


def test_policy_and_planner_arguments_of_the_wrong_kind() -> None:
    from memopt.activations.planner import _check_actions, parse_budget
    from memopt.activations.policy import ActivationPolicy

    with pytest.raises(TypeError, match=r"keep_ops is a tuple of op names, e.g. \('aten.mm',\)"):
        recompute(keep_ops="aten.mm")  # type: ignore[arg-type]  (it was split into letters)
    with pytest.raises(TypeError, match="seq_dim='1'; it must be an int"):
        ActivationPolicy("split", seq_dim="1")  # type: ignore[arg-type]  (failed in backward)
    with pytest.raises(TypeError, match=r"actions is a tuple of action names"):
        _check_actions("recompute")
    assert parse_budget("1e9", 1) == parse_budget(1.0e9, 1) == 10**9  # as config sizes take


def test_torch_func_transforms_get_a_clear_error() -> None:
    """torch.func.grad (and vjp/jacrev/hessian) does not support saved-tensor hooks, and a
    checkpoint's ledger holds cannot read vmap/jvp's wrapped tensors: a clear error naming
    the block and the transform, not "Cannot access storage of TensorWrapper". What works
    (keep/swap under vmap with grad, or under jvp) keeps working."""
    from torch.func import functional_call, grad, jvp, vmap

    model = make_stack(depth=2)
    x = torch.randn(4, 64)
    params = dict(model.named_parameters())
    for policy in (keep(), swap(), recompute()):
        with apply(model, {"blocks.0": policy}, options=OPTS):
            with pytest.raises(NotImplementedError, match=r"'blocks\.0'.*torch\.func.*\(grad;"):
                grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    with apply(model, {"blocks.0": recompute()}):
        with pytest.raises(NotImplementedError, match=r"'blocks\.0' \(recompute\).*\(jvp;"):
            jvp(model, (x,), (torch.ones_like(x),))
    ref = grads(model, lambda m: vmap(lambda r: m(r[None]).sum())(x).sum())
    with apply(model, {"blocks.0": swap()}, options=OPTS):
        assert same(grads(model, lambda m: vmap(lambda r: m(r[None]).sum())(x).sum()), ref)
