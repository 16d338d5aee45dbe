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
after the backward node that used it), or by ``close()``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from memopt.activations.hooks import (
    Kept,
    WeightKeys,
    check_version,
    counting_hooks,
    is_plain_tensor,
    is_weight,
    param_storages,
)
from memopt.activations.install import INSTALLERS, InstallContext, Installed, hooked_block
from memopt.activations.ledger import SavedLedger, Token
from memopt.activations.policy import ActivationPolicy
from memopt.activations.prefetch import Run
from memopt.activations.transfer import CopyBackend, Pending, Slot, SlotPool
from memopt.offload.arena import PinnedArena
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier

__all__ = ["SwapEngine", "SwapRecord", "SwappedTensor", "install_keep", "install_swap"]

_PLACE = {"cpu": "host", "nvme": "nvme"}


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over all of ``t``'s storage (shares it; no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class SwapRecord:
    """One storage's bytes on a tier, and (after a fetch) back on the device."""

    def __init__(self, engine: SwapEngine, src: torch.Tensor, slot: Slot, block: str) -> None:
        self.engine, self.slot, self.block = engine, slot, block
        self.device = src.device
        self.version = -1  # the in-place version of the tensor whose bytes were copied
        self._lock = threading.Lock()
        self._refs = 0
        self._released = False
        self._fetched: torch.Tensor | None = None
        self._fetch_pending: Pending | None = None
        self._adopted = False
        self._dev_token: Token | None = None
        self._src: torch.Tensor | None = src
        self._src_token: Token | None = engine.ledger.hold(src, place="device", block=block)
        self._host_token = engine.ledger.hold_bytes(
            slot.nbytes, key=("slot", slot.generation), place=_PLACE[slot.tier], block=block
        )
        self._out_pending = engine.write(slot, src)
        self.reap()

    def reap(self) -> bool:
        """Drop the device source once its copy out finished; True when nothing is in flight."""
        if self._src is None:
            return True
        if not self._out_pending.done():
            return False
        self._src = None
        if self._src_token is not None:
            self._src_token.release()
            self._src_token = None
        return True

    def prefetch(self) -> None:
        """Start the copy back to the device (idempotent; returns without waiting)."""
        with self._lock:
            if self._fetched is not None or self._released:
                return
            self.engine.pool.check(self.slot)
            if self.slot.tier == "nvme":
                self._out_pending.wait_host()  # the file must hold the bytes before we read them
                self.reap()  # the copy out is done: drop the device source before reading back
            buf, pending = self.engine.read(self.slot, self.device)
            self._fetched, self._fetch_pending = buf, pending
            self._dev_token = self.engine.ledger.hold(buf, place="device", block=self.block)

    def materialize(self) -> torch.Tensor:
        """The storage's bytes on the device (uint8), ready for use on the current stream."""
        if self._released:
            raise RuntimeError(
                f"swapped activation of block {self.block!r} was released before its backward "
                "used it (was the manager removed while the graph was alive?)"
            )
        self.prefetch()
        self.engine.pool.check(self.slot)
        with self._lock:
            buf, pending = self._fetched, self._fetch_pending
            assert buf is not None and pending is not None
            if not self._adopted:
                pending.wait_stream()
                self.engine.backend.adopt(buf)
                self._adopted = True
        return buf

    def restore(
        self, dtype: torch.dtype, size: torch.Size, stride: tuple[int, ...], offset: int,
        conj: bool = False, neg: bool = False,
    ) -> torch.Tensor:
        """A tensor view of the fetched bytes with the saved dtype/size/stride/offset, and the
        saved lazy conjugate / negative bits (a ``x.conj()`` view is x's bytes plus a flag:
        without it the backward would read x instead of conj(x))."""
        buf = self.materialize()
        out = torch.empty(0, dtype=dtype, device=buf.device)
        out = out.set_(buf.untyped_storage(), offset, size, stride)
        if neg:
            out = torch._neg_view(out)
        return torch._conj(out) if conj else out

    @property
    def released(self) -> bool:
        """True once the last packed form let go: the slot is freed and may not be reused."""
        return self._released

    def retain(self) -> None:
        with self._lock:
            self._refs += 1

    def release(self) -> None:
        """Drop one reference; the last one frees the slot and the fetched buffer."""
        with self._lock:
            self._refs -= 1
            if self._refs > 0 or self._released:
                return
            self._released = True
            pendings = [p for p in (self._out_pending, self._fetch_pending) if p is not None]
            self._fetched = None
            tokens = (self._dev_token, self._host_token)
            self._dev_token = None
        for tok in tokens:
            if tok is not None:
                tok.release()
        self.engine.retire(self, pendings)


class SwappedTensor:
    """The packed form of one saved tensor: a ``SwapRecord`` plus how to rebuild the view."""

    __slots__ = ("record", "dtype", "size", "stride", "offset", "conj", "neg", "version", "_ref")

    def __init__(self, record: SwapRecord, t: torch.Tensor) -> None:
        record.retain()
        self.record = record
        self.dtype, self.size, self.stride = t.dtype, t.size(), t.stride()
        self.offset = int(t.storage_offset())
        self.conj, self.neg = t.is_conj(), t.is_neg()
        self.version = t._version
        self._ref = weakref.ref(t)

    def unpack(self) -> torch.Tensor:
        orig = self._ref()
        if orig is not None:
            check_version(orig, self.version, f"and swapped by memopt, block {self.record.block!r}")
        return self.record.restore(
            self.dtype, self.size, self.stride, self.offset, self.conj, self.neg
        )

    def __del__(self) -> None:
        self.record.release()


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
        self._deferred: list[tuple[list[Pending], Slot]] = []
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
        record = SwapRecord(self, src, slot, block)
        record.version = t._version
        self.stats["swapped"] += 1
        self.stats["swapped_bytes"] += slot.nbytes
        if not record.reap():
            with self._lock:
                self._inflight.append(record)
        return record

    def retire(self, record: SwapRecord, pendings: list[Pending]) -> None:
        """Free a released record's slot once no copy still reads or writes it."""
        if all(p.done() for p in pendings):
            self.pool.free(record.slot)
            return
        with self._lock:
            self._deferred.append((pendings, record.slot))

    def reap(self) -> None:
        """Drop finished copies' device sources and free deferred slots (cheap polling).

        Copies out finish in issue order on a side stream, so the scan stops at the first one
        still running (an NVMe write finishing early is reaped on a later call)."""
        with self._lock:
            done = 0
            while done < len(self._inflight) and self._inflight[done].reap():
                done += 1
            del self._inflight[:done]
            ready = [s for ps, s in self._deferred if all(p.done() for p in ps)]
            self._deferred = [(ps, s) for ps, s in self._deferred if not all(p.done() for p in ps)]
        for slot in ready:
            self.pool.free(slot)

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
        for pendings, _slot in deferred:
            for p in pendings:
                p.wait_host()
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
    )
