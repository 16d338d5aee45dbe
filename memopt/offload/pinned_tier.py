"""The pinned CPU tier: tensors kept in the shared pinned host arena.

``allocate`` carves a block from a ``PinnedArena`` (the process-wide one by default);
``view(handle)`` is a typed tensor view into it, for code that computes on the host copy in
place (the CPU optimizer step). ``write_async`` / ``read_async`` copy between a tensor and the
block:

- a host tensor is copied at once (a memcpy at memory bandwidth; a thread would only add
  latency on a 2-core host) and the returned future is already done;
- a device tensor (CUDA) is copied with ``non_blocking=True`` on a side stream (truly
  asynchronous because the arena is pinned), and the future waits on a CUDA event recorded
  after the copy. Errors are kept and re-raised from ``wait()`` either way.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import weakref
from collections.abc import Sequence

import torch

from memopt.offload.arena import ArenaBlock, PinnedArena, default_arena
from memopt.offload.tier import (
    IOFuture,
    StorageTier,
    TierHandle,
    TierReport,
    check_io_tensor,
    live_entry,
    new_handle,
    request_nbytes,
)

__all__ = ["PinnedCPUTier"]


class PinnedCPUTier(StorageTier):
    """Host-memory tier over a pinned arena (page-aligned + mlock on CPU-only builds)."""

    name = "cpu"

    def __init__(self, arena: PinnedArena | None = None, alignment: int | None = None) -> None:
        self.arena = arena or default_arena()
        self.alignment = alignment
        self._blocks: dict[int, ArenaBlock] = {}
        self._lock = threading.Lock()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # A tier dropped without close() gives its blocks back to the arena (shared by the
        # whole process): every trial of a loop that dropped an optimizer kept its state.
        finalizer = weakref.finalize(self, _release_blocks, self.arena, self._blocks)
        finalizer.atexit = False  # at exit the memory goes with the process

    def allocate(
        self, nbytes_or_shape: int | Sequence[int], dtype: torch.dtype | None = None
    ) -> TierHandle:
        nbytes, shape = request_nbytes(nbytes_or_shape, dtype)
        block = self.arena.alloc(nbytes, self.alignment)
        handle = new_handle(self.name, nbytes, shape, dtype)
        with self._lock:
            self._blocks[handle.key] = block
        return handle

    def _block(self, handle: TierHandle) -> ArenaBlock:
        return live_entry(self._blocks, handle, repr(self.name))

    def view(self, handle: TierHandle) -> torch.Tensor:
        """The handle's bytes as a tensor of its shape/dtype (uint8 for a raw request)."""
        block = self._block(handle)
        return self.arena.tensor(block, handle.dtype or torch.uint8, handle.shape)

    def write_async(self, handle: TierHandle, tensor: torch.Tensor) -> IOFuture:
        check_io_tensor(handle, tensor, "PinnedCPUTier.write_async")
        dst = self.arena.bytes_view(self._block(handle))
        return self._copy(dst, tensor.reshape(-1).view(torch.uint8), "write", handle)

    def read_async(self, handle: TierHandle, out: torch.Tensor) -> IOFuture:
        check_io_tensor(handle, out, "PinnedCPUTier.read_async")
        src = self.arena.bytes_view(self._block(handle))
        return self._copy(out.reshape(-1).view(torch.uint8), src, "read", handle)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, op: str, h: TierHandle) -> IOFuture:
        describe = f"{self.name} tier {op} of handle {h.key} ({h.nbytes} bytes)"
        device = dst.device if dst.device.type != "cpu" else src.device
        if device.type != "cuda":
            try:
                dst.copy_(src)
            except Exception as err:  # noqa: BLE001 - kept for wait(), as the contract says
                return IOFuture.completed(err, describe)
            return IOFuture.completed(None, describe)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        piece: cf.Future[None] = cf.Future()
        threading.Thread(target=_wait_event, args=(event, piece), daemon=True).start()
        return IOFuture([piece], describe)

    def free(self, handle: TierHandle) -> None:
        block = self._block(handle)
        with self._lock:
            del self._blocks[handle.key]
        self.arena.free(block)

    def report(self) -> TierReport:
        """This tier's blocks; ``arena.report()`` covers every user of the arena."""
        with self._lock:
            blocks = list(self._blocks.values())
        whole = self.arena.report()
        return TierReport(
            requested_bytes=sum(b.nbytes for b in blocks),
            reserved_bytes=sum(b.reserved for b in blocks),
            pinned_bytes=whole.pinned_bytes,
            capacity_bytes=whole.capacity_bytes,
            live_handles=len(blocks),
        )

    def close(self) -> None:
        """Free every block (the tier stays usable: later allocations start afresh)."""
        with self._lock:
            blocks = list(self._blocks.values())
            self._blocks.clear()  # the same dict: the finalizer holds it
        for block in blocks:
            self.arena.free(block)


def _release_blocks(arena: PinnedArena, blocks: dict[int, ArenaBlock]) -> None:
    """The finalizer of a tier never closed (holds the arena and the block table, not the
    tier): hand its blocks back without waiting for the arena's lock."""
    held = list(blocks.values())
    blocks.clear()
    arena.release(held)


def _wait_event(event: torch.cuda.Event, piece: cf.Future) -> None:
    try:
        event.synchronize()
        piece.set_result(None)
    except BaseException as err:  # noqa: BLE001 - handed to the future
        piece.set_exception(err)
