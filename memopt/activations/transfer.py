"""Where swapped bytes live and how they move: generation-checked slots and the copy backend.

``SlotPool`` hands out room for one swapped storage on a tier: a block of the shared
``PinnedArena`` (tier ``"cpu"``) or a handle of an ``NVMeTier`` (``"nvme"``). Every slot gets
a fresh **generation** number, recorded in a table keyed by where the bytes are (arena chunk
and offset, or NVMe handle). ``check(slot)`` raises unless the table still maps that place to
that generation: a slot that was freed (by mistake, or by ``close()`` while a graph still
holds it) and possibly handed to someone else can never feed a stale tensor to the backward.

``CopyBackend`` moves bytes between the compute device and a host slot:

- CUDA: device-to-host copies run on a side stream that first waits for the compute stream;
  an event recorded after the copy says when the device buffer may be dropped (its owner keeps
  a reference until then, so the caching allocator cannot hand the memory out while the copy
  reads it). Host-to-device copies go into a buffer allocated on the side stream; the compute
  stream waits on the copy's event, and ``record_stream`` tells the allocator the buffer is used
  on the compute stream.
- CPU: the "device" is the CPU; copies are synchronous memcpys into and out of the arena (a
  thread would only add latency on a small host), and every ``Pending`` is done at once.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch

from memopt.offload.arena import ArenaBlock, PinnedArena
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.tier import IOFuture, TierHandle

__all__ = ["CopyBackend", "Pending", "Slot", "SlotPool", "StaleSlotError"]

_GENERATIONS = itertools.count(1)


class StaleSlotError(RuntimeError):
    """A swapped activation's slot was freed or reused before the backward read it."""


@dataclass(frozen=True)
class Slot:
    """Room for ``nbytes`` on ``tier``; ``generation`` ties it to one allocation."""

    tier: str
    key: tuple[int, ...]
    generation: int
    nbytes: int
    block: ArenaBlock | None = None
    handle: TierHandle | None = None


class SlotPool:
    """Slots on the pinned arena or an NVMe tier, each guarded by a generation number."""

    def __init__(self, arena: PinnedArena, nvme: NVMeTier | None = None) -> None:
        self.arena = arena
        self.nvme = nvme
        self._live: dict[tuple[int, ...], int] = {}
        self._slots: dict[tuple[int, ...], Slot] = {}
        self._lock = threading.Lock()

    def alloc(self, tier: str, nbytes: int) -> Slot:
        gen = next(_GENERATIONS)
        if tier == "cpu":
            block = self.arena.alloc(nbytes)
            slot = Slot("cpu", (id(self.arena), block.chunk, block.offset), gen, nbytes, block)
        elif tier == "nvme":
            if self.nvme is None:
                raise ValueError(
                    "a policy uses tier='nvme' but no NVMe tier was given; pass "
                    "apply(..., options=ActivationOptions(nvme=NVMeConfig(directory=...)))"
                )
            handle = self.nvme.allocate(nbytes)
            slot = Slot("nvme", (handle.key,), gen, nbytes, handle=handle)
        else:
            raise ValueError(f"unknown swap tier {tier!r}; choose 'cpu' or 'nvme'")
        with self._lock:
            self._live[slot.key] = gen
            self._slots[slot.key] = slot
        return slot

    def check(self, slot: Slot) -> None:
        with self._lock:
            live = self._live.get(slot.key)
        if live != slot.generation:
            state = "was freed" if live is None else f"was reused (generation {live})"
            raise StaleSlotError(
                f"swapped activation on tier {slot.tier!r} (generation {slot.generation}, "
                f"{slot.nbytes} bytes) {state} before the backward read it; was the manager "
                "removed, or the arena block freed, while a graph still needed it?"
            )

    def host_view(self, slot: Slot) -> torch.Tensor:
        assert slot.block is not None
        return self.arena.bytes_view(slot.block)

    def free(self, slot: Slot) -> None:
        with self._lock:
            if self._live.get(slot.key) != slot.generation:
                return
            del self._live[slot.key]
            del self._slots[slot.key]
        if slot.block is not None:
            self.arena.free(slot.block)
        elif slot.handle is not None and self.nvme is not None:
            self.nvme.free(slot.handle)

    def live_slots(self) -> int:
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        """Free every live slot (records still held by a graph will raise on unpack)."""
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            self.free(slot)


class Pending:
    """One copy in flight: a CUDA event, an IOFuture, or nothing (already done)."""

    __slots__ = ("event", "future")

    def __init__(
        self, event: torch.cuda.Event | None = None, future: IOFuture | None = None
    ) -> None:
        self.event = event
        self.future = future

    def done(self) -> bool:
        if self.future is not None and not self.future.done():
            return False
        return self.event is None or bool(self.event.query())

    def wait_host(self) -> None:
        """Block the calling thread until the copy finished (raises a tier error)."""
        if self.future is not None:
            self.future.wait()
        if self.event is not None:
            self.event.synchronize()

    def wait_stream(self) -> None:
        """Make the current stream wait (CUDA: no host sync); host-side work is waited."""
        if self.future is not None:
            self.future.wait()
        if self.event is not None:
            torch.cuda.current_stream(self.event.device).wait_event(self.event)


class CopyBackend:
    """Device <-> host byte copies: side stream + events on CUDA, synchronous on CPU."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> Pending:
        """Copy the uint8 ``src`` (device) into ``dst`` (host); keep ``src`` until done."""
        if src.device.type != "cuda":
            dst.copy_(src)
            return Pending()
        side = self._side(src.device)
        side.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return Pending(event)

    def to_device(self, src: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Pending]:
        """A new uint8 buffer on ``device`` filled from host ``src``; wait on the Pending."""
        if device.type != "cuda":
            return src.clone(), Pending()
        side = self._side(device)
        with torch.cuda.stream(side):
            out = torch.empty(src.shape, dtype=torch.uint8, device=device)
            out.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return out, Pending(event)

    def alloc_device(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A uint8 buffer for a tier read (NVMe), allocated on the side stream on CUDA."""
        if device.type != "cuda":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        with torch.cuda.stream(self._side(device)):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def adopt(self, buf: torch.Tensor) -> None:
        """Tell the allocator a side-stream buffer is now used on the compute stream."""
        if buf.device.type == "cuda":
            buf.record_stream(torch.cuda.current_stream(buf.device))
