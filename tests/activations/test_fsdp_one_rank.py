"""Managed blocks under a real FSDP2 ``fully_shard`` (one gloo rank), applied before or after it.

- Hugging Face gradient checkpointing stays on when ``apply`` runs before ``fully_shard``
  (``memopt.setup``'s order): ``fully_shard`` swaps each layer's class, and a forward bound at
  apply time called the inner HF wrapper, which does not checkpoint (2 attention forwards per
  step instead of 4, and every activation swapped instead of the layer inputs).
- ``split`` and ``sample`` recognise the all-gathered parameters as weights: read once at
  install time, the weight set missed FSDP2's per-forward unsharded storages, so ``split``
  swapped the weights to the tier as activations (2.5x the bytes) and the ``sample`` blocks'
  ledger counted them (2x the device peak).

Every case runs in this process, on a 1-rank gloo group made for it (and destroyed after,
unless one existed already): a spawned rank would spend most of the test importing.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch


def _run(order: str, policy: str) -> dict[str, Any]:
    """One step (two for split/sample) of a 2-layer tiny LLaMA; ``order``: ``"plain"`` (no
    fully_shard), ``"shard_first"`` or ``"apply_first"``."""
    from torch.distributed.fsdp import fully_shard

    from memopt.activations import ActivationOptions, apply
    from memopt.activations.policy import keep, sample, split, swap
    from tests.activations._models import llama_batch, tiny_llama
    from tests.activations.test_forward_lookup import hf_llama

    hf = policy in ("none", "keep", "swap")
    model = hf_llama() if hf else tiny_llama(layers=2)
    calls = [0]
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    make = {"keep": keep, "swap": swap, "split": lambda: split(0.5), "sample": lambda: sample(0.5)}
    plan = {f"model.layers.{i}": make[policy]() for i in range(2)} if policy != "none" else {}
    opts = ActivationOptions(min_swap_bytes=1024)
    mgr = apply(model, plan, options=opts) if order == "apply_first" else None
    if order != "plain":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(model.model.layers[0]).__name__.startswith("FSDP")
    if order != "apply_first":
        mgr = apply(model, plan, options=opts)
    x = llama_batch(seq=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(1 if hf else 2):
            model(input_ids=x, labels=x).loss.backward()
    assert mgr is not None
    out = {"attn": calls[0], "peak": mgr.ledger.peak("device"), **mgr.swap.stats}
    mgr.remove()
    return out


def _cases() -> dict[str, dict[str, Any]]:
    torch.manual_seed(0)
    got = {"none plain": _run("plain", "none")}
    for policy in ("keep", "swap", "split", "sample"):
        for order in ("plain", "shard_first", "apply_first"):
            if order == "plain" and policy in ("keep", "swap"):
                continue
            got[f"{policy} {order}"] = _run(order, policy)
    return got


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        store = tmp_path_factory.mktemp("fsdp1") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        return _cases()
    finally:
        if own:
            dist.destroy_process_group()


def test_apply_before_fully_shard_keeps_hf_gradient_checkpointing(cases) -> None:  # type: ignore[no-untyped-def]
    assert cases["none plain"]["attn"] == 4  # 2 layers x (forward + HF's recompute)
    for policy in ("keep", "swap"):
        first, after = cases[f"{policy} apply_first"], cases[f"{policy} shard_first"]
        assert first["attn"] == after["attn"] == 4, cases
        assert first["swapped"] == after["swapped"] and first["peak"] == after["peak"], cases
    assert cases["swap apply_first"]["swapped"] == 2  # under HF: the two layer inputs only


@pytest.mark.parametrize("policy", ["split", "sample"])
def test_all_gathered_weights_are_weights_under_fsdp2(cases, policy) -> None:  # type: ignore[no-untyped-def]
    plain = cases[f"{policy} plain"]
    for order in ("shard_first", "apply_first"):
        got = cases[f"{policy} {order}"]
        for key in ("swapped", "swapped_bytes", "weights", "peak"):
            assert got[key] == plain[key], (policy, order, key, got, plain)
    if policy == "split":
        assert plain["weights"] > 0 and plain["swapped"] > 0
