"""Swap: bit-identical gradients, ledger places, weights/duplicates skipped, stale slots caught."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from memopt.activations import ActivationOptions, SavedLedger, apply
from memopt.activations.policy import keep, swap
from memopt.activations.transfer import StaleSlotError
from memopt.offload.arena import ArenaConfig, PinnedArena
from tests.activations._models import (
    grads,
    llama_batch,
    llama_loss,
    make_stack,
    same,
    stack_loss,
    tiny_llama,
)

OPTS = ActivationOptions(min_swap_bytes=1024)


def _arena() -> PinnedArena:
    return PinnedArena(ArenaConfig(chunk_bytes=1 << 20, pin="off"))


def test_swap_mlp_gradients_bit_identical_and_slots_freed() -> None:
    model = make_stack()
    x = torch.randn(32, 64)
    ref = grads(model, stack_loss(x))
    arena = _arena()
    mgr = apply(model, {f"blocks.{i}": swap() for i in range(4)}, arena=arena, options=OPTS)
    assert same(grads(model, stack_loss(x)), ref)
    assert mgr.swap.stats["swapped"] > 0
    gc.collect()
    assert mgr.swap.pool.live_slots() == 0, "slots must be freed once the backward used them"
    assert arena.report().live_handles == 0
    assert mgr.ledger.current("host") == 0 and mgr.ledger.current("device") == 0
    assert mgr.scheduler.prefetches >= 3  # blocks 3..1 each prefetched the block before them
    mgr.remove()


def test_swap_tiny_llama_bit_identical() -> None:
    model = tiny_llama(layers=2)
    ids = llama_batch(seq=64)
    ref = grads(model, llama_loss(ids))
    mgr = apply(
        model, {"model.layers.0": swap(), "model.layers.1": swap()}, arena=_arena(), options=OPTS
    )
    assert same(grads(model, llama_loss(ids)), ref)
    assert mgr.swap.stats["swapped_bytes"] > 0
    mgr.remove()
    assert same(grads(model, llama_loss(ids)), ref)


def test_ledger_places_device_drops_host_rises() -> None:
    model = make_stack()
    x = torch.randn(64, 64)
    names = [f"blocks.{i}" for i in range(4)]
    kept = apply(model, {n: keep() for n in names}, options=OPTS)
    y = model(x).pow(2).mean()
    keep_device = kept.ledger.current("device")
    y.backward()
    kept.remove()

    ledger = SavedLedger()
    mgr = apply(model, {n: swap() for n in names}, ledger=ledger, arena=_arena(), options=OPTS)
    y = model(x).pow(2).mean()
    # after the forward: swapped blocks hold (nearly) nothing on the device, the host holds it
    assert ledger.current("device") <= 0.05 * keep_device
    assert ledger.current("host") >= 0.9 * keep_device
    y.backward()
    # during the backward only the block running and the one prefetched are back on device
    assert ledger.peak("device") <= 0.6 * keep_device
    assert ledger.peak("host") >= 0.9 * keep_device
    mgr.remove()


class _Dup(nn.Module):
    """Saves one activation twice (x*x saves x twice) and a view of it (a transpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w)
        return (h * h).sum() + (h.t() @ h).sum()


def test_weights_not_swapped_and_duplicates_counted_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Dup())
    x = torch.randn(128, 64, requires_grad=True)
    ref_loss = model(x)
    ref_loss.backward()
    ref = [x.grad.clone(), model[0].w.grad.clone()]
    x.grad = None
    model.zero_grad()
    ledger = SavedLedger()
    mgr = apply(model, {"0": swap()}, ledger=ledger, arena=_arena(), options=OPTS)
    loss = model(x)
    act_bytes = 128 * 64 * 4
    # saved: x (input), w (weight: skipped), h (saved by tanh, twice by mul, by t() @ h):
    # x and h are swapped once each; w is neither swapped nor counted.
    assert mgr.swap.stats["swapped"] == 2
    assert mgr.swap.stats["deduped"] >= 2
    assert mgr.swap.stats["weights"] >= 1
    assert ledger.current("host") == 2 * act_bytes
    assert ledger.current("device") == 0
    loss.backward()
    assert torch.equal(x.grad, ref[0]) and torch.equal(model[0].w.grad, ref[1])
    mgr.remove()


def test_stale_slot_reuse_is_detected() -> None:
    model = make_stack(depth=2)
    x = torch.randn(32, 64)
    arena = _arena()
    mgr = apply(model, {"blocks.0": swap(), "blocks.1": swap()}, arena=arena, options=OPTS)
    loss = model(x).pow(2).mean()
    # a bug frees block 0's slots early and someone else gets the same arena bytes
    pool = mgr.swap.pool
    victims = [s for s in list(pool._slots.values())]
    for slot in victims:
        pool.free(slot)
    others = [arena.alloc(s.nbytes) for s in victims]
    assert {(b.chunk, b.offset) for b in others} & {
        (s.block.chunk, s.block.offset) for s in victims if s.block
    }
    with pytest.raises(StaleSlotError, match="before the backward read it"):
        loss.backward()
    for b in others:
        arena.free(b)
    mgr.remove()


def test_inplace_modification_after_save_raises() -> None:
    """Autograd skips its version check under saved-tensor hooks; swap does it (while the
    saved tensor is still alive: a tensor modified and then freed cannot be observed)."""

    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sin()

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = M()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            z = self.inner(y)
            y.add_(1)  # modifies a tensor the inner block saved (and swapped)
            return z, y  # y stays alive: its version is checked at unpack

    x = torch.randn(64, 64, requires_grad=True)
    model = Outer()
    mgr = apply(model, {"inner": swap()}, arena=_arena(), options=OPTS)
    out = model(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out[0].sum().backward()
    mgr.remove()


def test_small_tensors_stay_on_device() -> None:
    model = make_stack(depth=2)
    x = torch.randn(4, 64)  # 1 KiB activations: below the threshold
    ledger = SavedLedger()
    mgr = apply(
        model,
        {"blocks.0": swap()},
        ledger=ledger,
        options=ActivationOptions(min_swap_bytes=1 << 20),
    )
    loss = model(x).pow(2).mean()
    assert mgr.swap.stats["swapped"] == 0 and mgr.swap.stats["small"] > 0
    assert ledger.current("device") > 0 and ledger.current("host") == 0
    loss.backward()
    mgr.remove()


def test_swap_to_nvme_tier(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from memopt.offload.nvme_file import NVMeConfig

    model = make_stack(depth=3)
    x = torch.randn(32, 64)
    ref = grads(model, stack_loss(x))
    cfg = NVMeConfig(tmp_path, capacity_bytes=1 << 20, grow_bytes=1 << 20, direct="prefer")
    ledger = SavedLedger()
    opts = ActivationOptions(min_swap_bytes=1024, nvme=cfg)
    mgr = apply(
        model, {"blocks.0": swap("nvme"), "blocks.2": swap("nvme")}, ledger=ledger, options=opts
    )
    model.zero_grad(set_to_none=True)
    loss = stack_loss(x)(model)
    assert ledger.current("nvme") > 0 and ledger.current("host") == 0
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    assert same(got, ref)
    gc.collect()
    assert mgr.swap.pool.live_slots() == 0 and ledger.current("nvme") == 0
    mgr.remove()


def test_nvme_swap_device_peak_never_exceeds_keep(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the device source stayed held after its write finished while the read-back buffer was
    # allocated beside it: up to 2x keep's device peak, on a timing-dependent share of steps
    from memopt.offload.nvme_file import NVMeConfig

    x = torch.randn(32, 64)
    model = make_stack(depth=3)
    with apply(model, {"blocks.0": keep(), "blocks.2": keep()}) as kept:
        stack_loss(x)(model).backward()
        keep_peak = kept.ledger.peak("device")
    model = make_stack(depth=3)
    cfg = NVMeConfig(tmp_path, capacity_bytes=1 << 20, grow_bytes=1 << 20, direct="prefer")
    opts = ActivationOptions(min_swap_bytes=1024, nvme=cfg)
    with apply(model, {"blocks.0": swap("nvme"), "blocks.2": swap("nvme")}, options=opts) as mgr:
        for _ in range(30):
            mgr.ledger.reset_peak()
            stack_loss(x)(model).backward()
            model.zero_grad(set_to_none=True)
            assert mgr.ledger.peak("device") <= keep_peak


def test_retain_graph_accumulation_and_no_prefetch() -> None:
    model = make_stack()
    x1, x2 = torch.randn(32, 64), torch.randn(32, 64)

    def two_microbatches(m: nn.Module) -> None:
        a = stack_loss(x1)(m)
        b = stack_loss(x2)(m)  # both graphs alive at once: runs of both chains are pending
        a.backward(retain_graph=True)
        a.backward()  # second backward through the same swapped activations
        b.backward()

    model.zero_grad(set_to_none=True)
    two_microbatches(model)
    ref = [p.grad.clone() for p in model.parameters()]
    for depth in (0, 2):
        opts = ActivationOptions(min_swap_bytes=1024, prefetch_depth=depth)
        mgr = apply(model, {f"blocks.{i}": swap() for i in range(4)}, arena=_arena(), options=opts)
        model.zero_grad(set_to_none=True)
        two_microbatches(model)
        assert same([p.grad for p in model.parameters()], ref)
        assert (mgr.scheduler.prefetches == 0) == (depth == 0)
        gc.collect()
        assert mgr.swap.pool.live_slots() == 0
        mgr.remove()


class _SavesButIgnores(torch.autograd.Function):
    """Saves its input (a pack call) but its backward never reads it (no unpack, no check)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x * 3

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g * 3


class _ModifiedBetweenSaves(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        a = _SavesButIgnores.apply(h)  # saves h at version 0
        h.add_(1)  # legal: nothing reads h's version-0 value in backward
        return a.sum() + h.sin().sum()  # sin saves h at version 1: must not reuse the v0 copy


def test_dedup_respects_inplace_version() -> None:
    x = torch.randn(64, 64, requires_grad=True)
    model = nn.Sequential(_ModifiedBetweenSaves())
    model(x).backward()
    ref = x.grad.clone()
    x.grad = None
    mgr = apply(model, {"0": swap()}, arena=_arena(), options=OPTS)
    model(x).backward()
    assert torch.equal(x.grad, ref)
    assert mgr.swap.stats["deduped"] == 0 and mgr.swap.stats["swapped"] >= 2
    mgr.remove()


def test_autocast_weight_copies_not_swapped() -> None:
    model = make_stack()
    x = torch.randn(48, 64)  # bf16 activations: 6144 bytes; bf16 weight copies: 8192 bytes

    def loss_fn(m: nn.Module) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float().pow(2).mean()

    ref = grads(model, loss_fn)
    mgr = apply(model, {f"blocks.{i}": swap() for i in range(4)}, arena=_arena(), options=OPTS)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    sizes = sorted({s.nbytes for s in mgr.swap.pool._slots.values()})
    assert sizes and 64 * 64 * 2 not in sizes, sizes
    loss.backward()
    assert same([p.grad for p in model.parameters()], ref)
    mgr.remove()


def test_remove_while_graph_alive_raises_on_backward() -> None:
    model = make_stack(depth=2)
    arena = _arena()
    mgr = apply(model, {"blocks.0": swap(), "blocks.1": swap()}, arena=arena, options=OPTS)
    loss = stack_loss(torch.randn(32, 64))(model)
    mgr.remove()  # frees every slot although the graph still refers to them
    assert arena.report().live_handles == 0
    with pytest.raises(StaleSlotError, match="was freed"):
        loss.backward()


def test_prefetch_starts_at_next_blocks_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block i's copies back start when block i+1's backward starts, before block i unpacks."""
    from memopt.activations import swap as swap_mod

    log: list[tuple[str, str]] = []
    real_prefetch, real_unpack = swap_mod.SwapRecord.prefetch, swap_mod.SwappedTensor.unpack

    def prefetch(self):  # type: ignore[no-untyped-def]
        if self._fetched is None:
            log.append(("prefetch", self.block))
        return real_prefetch(self)

    def unpack(self):  # type: ignore[no-untyped-def]
        log.append(("unpack", self.record.block))
        return real_unpack(self)

    monkeypatch.setattr(swap_mod.SwapRecord, "prefetch", prefetch)
    monkeypatch.setattr(swap_mod.SwappedTensor, "unpack", unpack)
    model = make_stack()
    names = [f"blocks.{i}" for i in range(4)]
    mgr = apply(model, {n: swap() for n in names}, arena=_arena(), options=OPTS)
    stack_loss(torch.randn(32, 64))(model).backward()
    first = {(kind, b): log.index((kind, b)) for kind, b in log}
    last = {(kind, b): i for i, (kind, b) in enumerate(log)}
    for i in range(3):
        lower, upper = names[i], names[i + 1]
        # block i's copies back were issued after block i+1's, while block i+1's backward was
        # still unpacking (overlap), and before block i needed them
        assert first[("prefetch", upper)] < first[("prefetch", lower)] < first[("unpack", lower)]
        assert first[("prefetch", lower)] < last[("unpack", upper)]
    mgr.remove()
