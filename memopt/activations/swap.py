"""Swap: a block's saved activations go to a storage tier and come back, prefetched, for backward.

The block's forward runs under ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``.
``pack(t)`` for each tensor autograd saves:

1. a parameter or buffer of the model, a view of one (same storage), or autocast's cast copy
   of a parameter: kept as is, not counted (it is a weight, not an activation;
   ``save_on_cpu`` offloads it);
2. a storage below ``min_swap_bytes``, or a tensor that is not a plain strided one: kept on the
   device and counted in the ledger under ``"device"``;
3. otherwise the tensor's **whole storage** is swapped once per block call: a second save of the
   same storage (a duplicate save, or another view of it) reuses the first ``SwapRecord``
   (identity checked with a storage weak reference, so an address reused after a free is a new
   storage, and the same in-place version: bytes modified in between are copied again; a
   record already released, because every save of it died during the forward, is not reused).
   The packed form keeps dtype/size/stride/offset and the lazy conjugate/negative bits, and
   rebuilds the exact view.

A ``SwapRecord`` copies the storage's bytes into a generation-checked ``Slot`` (``transfer``):
on CUDA on a side stream, the device buffer being held (and counted under ``"device"``) until
the copy's event completes; on CPU synchronously into the pinned arena. ``prefetch()`` starts
the copy back (the ``PrefetchScheduler`` calls it when the next block's backward starts);
``unpack`` waits for it, checks the slot's generation and the saved tensor's in-place version
(autograd skips its own version check when hooks are installed, so it is done here: a tensor
modified in place after it was saved raises, as it would without hooks), and returns the
view. The slot is freed when autograd drops the last packed form that refers to it (right
after the backward node that used it), or by ``close()``; when a copy still uses it then (a
graph dropped without a backward), ``SwapEngine.retire`` frees it, and the device source, when
the copy ends (see there). ``SwapRecord`` and ``SwappedTensor`` live in ``swaprecord.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from memopt.activations.hooks import (
    Kept,
    WeightKeys,
    counting_hooks,
    is_plain_tensor,
    is_weight,
    param_storages,
)
from memopt.activations.install import INSTALLERS, InstallContext, Installed, hooked_block
from memopt.activations.ledger import SavedLedger
from memopt.activations.policy import ActivationPolicy
from memopt.activations.prefetch import Run
from memopt.activations.swaprecord import SwappedTensor, SwapRecord
from memopt.activations.transfer import CopyBackend, Pending, Slot, SlotPool
from memopt.offload.arena import PinnedArena
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier

__all__ = ["SwapEngine", "SwapRecord", "SwappedTensor", "install_keep", "install_swap"]

def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over all of ``t``'s storage (shares it; no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class SwapEngine:
    """Slots, copies and in-flight bookkeeping shared by all swapping blocks of one manager."""

    def __init__(
        self,
        ledger: SavedLedger,
        arena: PinnedArena,
        nvme: NVMeConfig | None = None,
        min_swap_bytes: int = 4096,
    ) -> None:
        self.ledger = ledger
        self.min_swap_bytes = min_swap_bytes
        self._nvme_config = nvme
        self.pool = SlotPool(arena)
        self.backend = CopyBackend()
        self._inflight: list[SwapRecord] = []
        self._deferred: list[tuple[list[Pending], SwapRecord]] = []
        self._lock = threading.Lock()
        self.stats = {"swapped_bytes": 0, "swapped": 0, "deduped": 0, "weights": 0, "small": 0}

    # --- tier I/O ----------------------------------------------------------------------------

    def _nvme(self) -> NVMeTier:
        if self.pool.nvme is None:
            if self._nvme_config is None:
                raise ValueError(
                    "a policy uses tier='nvme' but no NVMe directory was given; pass "
                    "apply(..., options=ActivationOptions(nvme=NVMeConfig(directory=...)))"
                )
            self.pool.nvme = NVMeTier(self._nvme_config, arena=self.pool.arena)
        return self.pool.nvme

    def write(self, slot: Slot, src: torch.Tensor) -> Pending:
        if slot.tier == "cpu":
            return self.backend.to_host(src, self.pool.host_view(slot))
        assert slot.handle is not None
        return Pending(future=self._nvme().write_async(slot.handle, src))

    def read(self, slot: Slot, device: torch.device) -> tuple[torch.Tensor, Pending]:
        if slot.tier == "cpu":
            return self.backend.to_device(self.pool.host_view(slot), device)
        assert slot.handle is not None
        buf = self.backend.alloc_device(slot.nbytes, device)
        return buf, Pending(future=self._nvme().read_async(slot.handle, buf))

    # --- records ----------------------------------------------------------------------------

    def store(self, t: torch.Tensor, tier: str, block: str) -> SwapRecord:
        """Swap all of ``t``'s storage to ``tier``; the record frees itself when released."""
        src = _storage_bytes(t)
        if tier == "nvme":
            self._nvme()
        slot = self.pool.alloc(tier, src.numel())
        try:
            record = SwapRecord(self, src, slot, block)
        except BaseException:  # the tier refused the write (a full NVMe file): no record holds it
            self.pool.free(slot)
            raise
        record.version = t._version
        self.stats["swapped"] += 1
        self.stats["swapped_bytes"] += slot.nbytes
        if not record.reap():
            with self._lock:
                self._inflight.append(record)
        return record

    def retire(self, record: SwapRecord, pendings: list[Pending]) -> None:
        """Free a released record's slot and device source once no copy still uses them.

        Now when its copies are done; else as soon as the last one finishes when they are all
        tier futures (NVMe: a done-callback, on the I/O thread); else (CUDA events cannot call
        back) at the next poll: a later release, a pack, an unpack, or any managed forward,
        with or without grad. So a graph dropped without a backward (an exception, a skipped
        batch) gives back its sources, slots and ledger bytes without another training step."""
        waiting = [p for p in pendings if not p.done()]
        if not waiting:
            self._forget(record)
            self.reap()
            return
        entry = (pendings, record)
        with self._lock:
            self._deferred.append(entry)
        record.reap()  # the copy out may be done while a copy back still runs
        futures = [p.future for p in waiting if p.event is None]
        if len(futures) == len(waiting):
            self._settle_when_done(entry, futures)
        self.reap()

    def _forget(self, record: SwapRecord) -> None:
        """A released record whose copies are all done: drop its source, free its slot."""
        record.drop_source()
        with self._lock:
            if any(r is record for r in self._inflight):
                self._inflight = [r for r in self._inflight if r is not record]
        self.pool.free(record.slot)

    def _settle_when_done(self, entry: tuple[list[Pending], SwapRecord], futures: list) -> None:
        """Forget ``entry``'s record when the last of ``futures`` finishes (a future that
        cannot call back, like a test's fake, leaves it to polling)."""
        if not all(hasattr(f, "add_done_callback") for f in futures):
            return
        left, count = [len(futures)], threading.Lock()

        def one_done(_err: BaseException | None) -> None:
            with count:
                left[0] -= 1
                if left[0]:
                    return
            with self._lock:  # reap() or close() may have taken it already
                mine = any(e is entry for e in self._deferred)
                self._deferred = [e for e in self._deferred if e is not entry]
            if mine:
                self._forget(entry[1])

        for fut in futures:
            fut.add_done_callback(one_done)

    def reap(self) -> None:
        """Drop finished copies' device sources and free deferred slots (cheap polling).

        Copies out finish in issue order on a side stream, so the scan stops at the first one
        still running (an NVMe write finishing early is reaped on a later call)."""
        with self._lock:
            done = 0
            while done < len(self._inflight) and self._inflight[done].reap():
                done += 1
            del self._inflight[:done]
            ready: list[tuple[list[Pending], SwapRecord]] = []
            waiting: list[tuple[list[Pending], SwapRecord]] = []
            for entry in self._deferred:  # the same tuples: a done-callback finds its own by id
                (ready if all(p.done() for p in entry[0]) else waiting).append(entry)
            self._deferred = waiting
        for _pendings, record in ready:
            self._forget(record)

    def packer(
        self, block: str, tier: str, params: WeightKeys, run: Run | None = None
    ) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
        """The pack/unpack pair for one forward call of a swapped block."""
        seen: dict[int, tuple[StorageWeakRef, SwapRecord]] = {}

        where = f"block {block!r}"

        def pack(t: torch.Tensor) -> Kept | SwappedTensor:
            if not is_plain_tensor(t) or is_weight(t, params):
                self.stats["weights"] += 1
                return Kept(t, None, where)
            storage = t.untyped_storage()
            if storage.nbytes() < max(self.min_swap_bytes, 1):
                self.stats["small"] += 1
                return Kept(t, self.ledger.hold(t, place="device", block=block), where)
            self.reap()
            hit = seen.get(storage.data_ptr())
            # a record whose packed forms all died already (a temporary's node freed during the
            # forward: ``x.pow(2).sum().item()``) has freed its slot: swap the storage afresh
            if (hit is not None and not hit[0].expired() and not hit[1].released
                    and hit[1].version == t._version):
                self.stats["deduped"] += 1
                return SwappedTensor(hit[1], t)
            record = self.store(t, tier, block)
            seen[storage.data_ptr()] = (StorageWeakRef(storage), record)
            if run is not None:
                run.add(record)
            return SwappedTensor(record, t)

        def unpack(packed: Kept | SwappedTensor) -> torch.Tensor:
            if isinstance(packed, Kept):
                return packed.get()
            self.reap()
            return packed.unpack()

        return pack, unpack

    def close(self) -> None:
        """Wait for copies in flight, free every slot, close the NVMe tier if one was opened."""
        with self._lock:
            inflight, self._inflight = self._inflight, []
            deferred, self._deferred = self._deferred, []
        for record in inflight:
            record._out_pending.wait_host()
            record.reap()
        for pendings, record in deferred:
            for p in pendings:
                p.wait_host()
            record.drop_source()
        self.pool.close()
        if self.pool.nvme is not None:
            self.pool.nvme.close()
            self.pool.nvme = None


@INSTALLERS.register("keep")
def install_keep(module: nn.Module, policy: ActivationPolicy, ctx: InstallContext) -> Installed:
    """``keep``: nothing moves; the saved tensors are counted in the ledger."""
    return hooked_block(
        module,
        ctx,
        lambda run: counting_hooks(ctx.ledger, ctx.block_name, param_storages(ctx.root)),
    )


@INSTALLERS.register("swap")
def install_swap(module: nn.Module, policy: ActivationPolicy, ctx: InstallContext) -> Installed:
    """``swap``: saved activations go to ``policy.tier`` and are prefetched for backward."""
    return hooked_block(
        module,
        ctx,
        lambda run: ctx.swap.packer(ctx.block_name, policy.tier, param_storages(ctx.root), run),
        "swap",
    )
