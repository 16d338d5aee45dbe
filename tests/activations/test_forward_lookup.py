"""A managed block calls the forward its module has *now*, not the one it had at ``apply``.

FSDP2's ``fully_shard`` swaps each sharded module's class for a generated subclass. Hugging
Face (transformers 5) wraps ``forward`` per class and checkpoints only in the outermost wrapper
(``type(self).forward is forward_with_checkpointing``), so a wrapper that bound the forward at
apply time, before ``fully_shard`` (the order ``memopt.setup`` uses), kept calling the inner
wrapper: HF gradient checkpointing was silently off (a third of the layer forwards per step,
and the un-checkpointed activation memory); test_fsdp_one_rank.py checks that on a real
``fully_shard``. Also: the one-time warning when HF gradient checkpointing runs inside a
managed block's policy (the two stack).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from memopt.activations import ActivationOptions, apply
from memopt.activations.policy import keep, recompute, sample, swap
from tests.activations._models import Block, llama_batch, make_stack, stack_loss, tiny_llama


@pytest.mark.parametrize("policy", [keep(), swap(), recompute(), sample(0.5)])
def test_class_swapped_after_apply_runs_the_new_forward(policy) -> None:  # type: ignore[no-untyped-def]
    model = make_stack(depth=2)
    calls = []

    class Swapped(Block):  # what fully_shard does: a subclass put in place of the class
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            calls.append(torch.is_grad_enabled())
            return super().forward(x, scale)

    mgr = apply(model, {"blocks.0": policy}, options=ActivationOptions(min_swap_bytes=1024))
    model.blocks[0].__class__ = Swapped
    x = torch.randn(8, 64)
    stack_loss(x)(model).backward()
    assert calls and calls[0] is True  # the managed forward ran the subclass's forward
    with torch.no_grad():
        model(x)
    assert calls[-1] is False
    mgr.remove()
    n = len(calls)
    model(x)
    assert len(calls) == n + 1 and "forward" not in model.blocks[0].__dict__


def test_an_instance_forward_present_at_apply_is_the_one_called() -> None:
    model = make_stack(depth=2)
    block = model.blocks[0]
    calls = []

    def own(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        calls.append(1)
        return Block.forward(block, x, scale)

    block.forward = own  # type: ignore[method-assign]
    mgr = apply(model, {"blocks.0": swap()}, options=ActivationOptions(min_swap_bytes=1024))
    stack_loss(torch.randn(8, 64))(model).backward()
    assert calls == [1] and mgr.swap.stats["swapped"] > 0
    mgr.remove()
    assert block.forward is own


def hf_llama() -> nn.Module:
    """A 2-layer tiny LLaMA in training mode with HF gradient checkpointing on."""
    model = tiny_llama(layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' rename notice
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    return model


def _memopt_warnings(model: nn.Module) -> list[str]:
    x = llama_batch(seq=16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
    return [str(w.message) for w in seen if str(w.message).startswith("memopt.activations")]


def test_hf_checkpointing_under_a_policy_warns_once() -> None:
    from memopt._utils.logging import _reset_warn_once

    _reset_warn_once()
    model = hf_llama()
    mgr = apply(model, {f"model.layers.{i}": recompute() for i in range(2)})
    msgs = _memopt_warnings(model)
    assert len(msgs) == 1, msgs  # two blocks, two steps: one warning
    assert "'recompute'" in msgs[0] and "checkpointing_disable()" in msgs[0]
    mgr.remove()
    model = hf_llama()  # keep only counts what HF saves: nothing stacks, no warning
    with apply(model, {f"model.layers.{i}": keep() for i in range(2)}):
        assert _memopt_warnings(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()  # HF off: a policy alone warns nothing
    _reset_warn_once()
    with apply(model, {f"model.layers.{i}": swap() for i in range(2)}):
        assert _memopt_warnings(model) == []
