"""The NVMe tier: one preallocated file per rank, an offset table, O_DIRECT, async I/O.

Layout: the file (see ``nvme_file``) is carved by a ``FreeListAllocator`` with a 4096-byte
granule; the **offset table** maps each live handle to its committed slot. No file per tensor,
no open/close per I/O: the fd stays open and every request is a positional read or write.

Write path (crash-consistent per handle): ``write_async`` writes into a **shadow slot** and,
only once every piece has succeeded, swaps the table entry to it and frees the old slot. A
failed write (ENOSPC, EIO, ...) frees the shadow slot and leaves the table, and so the
previous content, untouched; ``wait()`` raises the ``OSError`` with its errno. Writes to one
handle commit in submission order (a late finisher never overwrites a newer commit). A read
pins the slot it reads (a reader count), so a concurrent write commit cannot recycle it.

Buffers: O_DIRECT needs page-aligned addresses and lengths. A host tensor whose data pointer is
4096-aligned (any tensor from the pinned arena) is read or written in place for its aligned
prefix and through a one-page bounce block for the tail; any other tensor (unaligned, or on a
device) goes through a bounce block of its size from the pinned arena.

Concurrency: ``submit`` returns at once; the backend (``make_backend``: native Linux AIO
when built, else threads; ``MEMOPT_AIO`` overrides) keeps ``queue_depth`` pieces of
``block_size`` in flight; several writes and reads may be outstanding together. A request is
slotted, submitted and tracked with Ctrl-C held back (``sigdefer``), so an interrupt never
leaves I/O in flight that nothing waits for. The tier belongs to the process that made it:
in a forked child any use is a RuntimeError and close/finalizer leave the parent's file.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from memopt.offload.allocator import FreeListAllocator, round_up
from memopt.offload.arena import ArenaBlock, PinnedArena, default_arena
from memopt.offload.io_backend import IOBackend, IOOp
from memopt.offload.native_aio import make_backend
from memopt.offload.nvme_file import (
    NVMeConfig,
    SwapFile,
    close_swap_file,
    grow_swap_file,
    open_swap_file,
)
from memopt.offload.sigdefer import deferred_sigint
from memopt.offload.tier import (
    IOFuture,
    StorageTier,
    TierHandle,
    TierReport,
    check_io_tensor,
    check_process,
    live_entry,
    new_handle,
    request_nbytes,
    wait_all,
)

__all__ = ["NVMeTier"]

ALIGN = 4096


@dataclass
class _Slot:
    offset: int
    readers: int = 0
    retired: bool = False


@dataclass
class _Entry:
    handle: TierHandle
    slot: _Slot
    committed_seq: int = 0
    next_seq: int = 0


class NVMeTier(StorageTier):
    """Tensors in one O_DIRECT file per rank, moved by an asynchronous ``IOBackend``."""

    name = "nvme"

    def __init__(
        self,
        config: NVMeConfig,
        arena: PinnedArena | None = None,
        backend: IOBackend | None = None,
    ) -> None:
        self.config = config
        self.arena = arena or default_arena()
        self.file = open_swap_file(config)
        try:
            self.backend = backend or make_backend(
                config.queue_depth, config.block_size, direct=self.file.direct
            )
        except BaseException:
            close_swap_file(self.file, config.keep_file)
            raise
        # A tier dropped without close() (or alive at interpreter exit) still stops the I/O
        # threads it made and removes its preallocated file: scratch space must not outlive
        # the process.
        # A process forked from this one inherits the tier (and the finalizer) but not its
        # I/O threads: the finalizer and close() there leave the parent's file alone, and
        # any use is a RuntimeError (check_process).
        self._pid = os.getpid()
        owned = None if backend is not None else self.backend
        self._finalizer = weakref.finalize(
            self, _discard, self.file, config.keep_file, owned, self._pid
        )
        self._slots = FreeListAllocator(self.file.size, granule=ALIGN)
        self._table: dict[int, _Entry] = {}
        self._pending: dict[int, set[IOFuture]] = {}
        self._bounce_bytes = 0
        self._lock = threading.RLock()

    @property
    def direct(self) -> bool:
        """Whether O_DIRECT is in use (False after a ``direct='prefer'`` fallback)."""
        return self.file.direct

    # --- space ---------------------------------------------------------------------------

    def _new_slot(self, nbytes: int) -> _Slot:
        with self._lock:
            off = self._slots.allocate(nbytes, ALIGN)
            if off is None:
                need = round_up(max(nbytes, 1), ALIGN)
                if not self.config.grow_bytes:
                    stats = self._slots.stats()
                    raise OSError(
                        errno.ENOSPC,
                        f"NVMe tier file {self.file.path} is full: {nbytes} bytes asked, "
                        f"largest free slot {stats.largest_free} of {stats.capacity}; raise "
                        "NVMeConfig.capacity_bytes or set grow_bytes",
                    )
                grow = max(self.config.grow_bytes, need)
                grow_swap_file(self.file, grow, need)  # raises with file and slots as they were
                self._slots.extend(grow)
                off = self._slots.allocate(nbytes, ALIGN)
                assert off is not None
            return _Slot(off)

    def _release_slot(self, slot: _Slot) -> None:
        with self._lock:
            slot.retired = True
            if slot.readers == 0:
                self._slots.free(slot.offset)

    def allocate(
        self, nbytes_or_shape: int | Sequence[int], dtype: torch.dtype | None = None
    ) -> TierHandle:
        self._check_open()
        nbytes, shape = request_nbytes(nbytes_or_shape, dtype)
        slot = self._new_slot(nbytes)
        handle = new_handle(self.name, nbytes, shape, dtype)
        with self._lock:
            self._table[handle.key] = _Entry(handle, slot)
        return handle

    def _entry(self, handle: TierHandle) -> _Entry:
        self._check_open()
        return live_entry(self._table, handle, "NVMe")

    def _check_open(self) -> None:
        check_process(self._pid, f"NVMe tier ({self.file.path})")
        if self.file.fd < 0:
            raise RuntimeError(
                f"this NVMe tier ({self.file.path}) was closed: its handles are gone; make a "
                "new tier (or a new optimizer) to use the disk again"
            )

    def free(self, handle: TierHandle) -> None:
        """Wait for the handle's I/O still in flight (ignoring its errors), then free."""
        entry = self._entry(handle)
        for fut in list(self._pending.get(handle.key, ())):
            try:
                fut.wait()
            except OSError:
                pass
        with self._lock:
            del self._table[handle.key]
            self._pending.pop(handle.key, None)
            self._release_slot(entry.slot)

    # --- I/O -----------------------------------------------------------------------------

    def _bounce(self, nbytes: int) -> ArenaBlock:
        block = self.arena.alloc(round_up(nbytes, ALIGN), ALIGN)
        with self._lock:
            self._bounce_bytes += block.reserved
        return block

    def _unbounce(self, block: ArenaBlock) -> None:
        self.arena.free(block)
        with self._lock:
            self._bounce_bytes -= block.reserved

    def _submit(self, op: IOOp, ptr: int, nbytes: int, offset: int, label: str) -> list:
        return self.backend.submit(op, self.file.fd, ptr, nbytes, offset, label)

    def _plan(self, tensor: torch.Tensor) -> tuple[int, int, ArenaBlock | None]:
        """(address, in-place bytes, bounce block): in place when the tensor allows it."""
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGN == 0:
            direct = nbytes - nbytes % ALIGN
            tail = self._bounce(ALIGN) if direct < nbytes else None
            return tensor.data_ptr(), direct, tail
        return 0, 0, self._bounce(nbytes)

    def _track(self, key: int, fut: IOFuture) -> IOFuture:
        with self._lock:
            self._pending.setdefault(key, set()).add(fut)

        def untrack(_err: BaseException | None) -> None:
            with self._lock:
                self._pending.get(key, set()).discard(fut)

        fut.add_done_callback(untrack)
        return fut

    def _start(
        self, op: IOOp, buf: torch.Tensor, offset: int, label: str, undo: Callable[[], None]
    ) -> tuple[IOFuture, ArenaBlock | None, int]:
        """Plan, stage and submit one request: (its future, its bounce block, in-place bytes).
        On an error nothing stays behind: the pieces already submitted are waited for, the
        bounce block is given back and ``undo`` runs (releases the slot)."""
        pieces: list[cf.Future] = []
        bounce = None
        try:
            ptr, direct, bounce = self._plan(buf)
            if op == "write" and bounce is not None:
                staged = self.arena.bytes_view(bounce)
                staged[: buf.numel() - direct].copy_(buf[direct:])
                staged[buf.numel() - direct :].zero_()
            if direct:
                pieces += self._submit(op, ptr, direct, offset, label)
            if bounce is not None:
                pieces += self._submit(op, bounce.ptr, bounce.reserved, offset + direct, label)
            # buf must outlive the pieces that read or fill it
            return IOFuture(pieces, label, keep_alive=buf), bounce, direct
        except BaseException:
            cf.wait(pieces)
            if bounce is not None:
                self._unbounce(bounce)
            undo()
            raise

    def write_async(self, handle: TierHandle, tensor: torch.Tensor) -> IOFuture:
        check_io_tensor(handle, tensor, "NVMeTier.write_async")
        entry = self._entry(handle)
        if handle.nbytes == 0:
            return IOFuture.completed()
        src = tensor.reshape(-1).view(torch.uint8)
        label = f"NVMe tier write of handle {handle.key} to {self.file.path}"
        # From the shadow slot to the tracked future in one go: a Ctrl-C in between left I/O
        # in flight that nothing waited for, and its slot and bounce block never came back.
        with deferred_sigint():
            shadow = self._new_slot(handle.nbytes)
            with self._lock:
                entry.next_seq += 1
                seq = entry.next_seq
            fut, bounce, _ = self._start(
                "write", src, shadow.offset, label, lambda: self._release_slot(shadow)
            )

            def commit(err: BaseException | None) -> None:
                if bounce is not None:
                    self._unbounce(bounce)
                with self._lock:
                    stale = seq < entry.committed_seq or handle.key not in self._table
                    if err is not None or stale:
                        self._release_slot(shadow)  # previous content stays the committed one
                        return
                    old, entry.slot, entry.committed_seq = entry.slot, shadow, seq
                    self._release_slot(old)

            fut.add_done_callback(commit)
            return self._track(handle.key, fut)

    def _unpin(self, slot: _Slot) -> None:
        with self._lock:
            slot.readers -= 1
            if slot.retired and slot.readers == 0:
                self._slots.free(slot.offset)

    def read_async(self, handle: TierHandle, out: torch.Tensor) -> IOFuture:
        check_io_tensor(handle, out, "NVMeTier.read_async")
        entry = self._entry(handle)
        if handle.nbytes == 0:
            return IOFuture.completed()
        dst = out.reshape(-1).view(torch.uint8)
        label = f"NVMe tier read of handle {handle.key} from {self.file.path}"
        with deferred_sigint():  # pin, submit and track together (see write_async)
            with self._lock:
                slot = entry.slot
                slot.readers += 1
            fut, bounce, direct = self._start(
                "read", dst, slot.offset, label, lambda: self._unpin(slot)
            )

            def finish(err: BaseException | None) -> None:
                self._unpin(slot)
                if bounce is not None:
                    try:
                        if err is None:
                            staged = self.arena.bytes_view(bounce)
                            # dst may be an inference tensor (a read started under
                            # torch.inference_mode()); this runs on an I/O thread, where
                            # that mode is off and an in-place copy into it would fail
                            with torch.inference_mode():
                                dst[direct:].copy_(staged[: dst.numel() - direct])
                    finally:
                        self._unbounce(bounce)

            fut.add_done_callback(finish)
            return self._track(handle.key, fut)

    # --- bookkeeping ---------------------------------------------------------------------

    def report(self) -> TierReport:
        """requested: live handles' bytes; reserved: file bytes in slots (shadow slots of
        writes in flight included); pinned: bounce bytes held in the arena; capacity: file."""
        with self._lock:
            stats = self._slots.stats()
            return TierReport(
                requested_bytes=sum(e.handle.nbytes for e in self._table.values()),
                reserved_bytes=stats.reserved,
                pinned_bytes=self._bounce_bytes,
                capacity_bytes=self.file.size,
                live_handles=len(self._table),
            )

    def check_usable(self) -> None:
        self._check_open()

    def flush(self) -> None:
        """Wait for every operation in flight; raise the first error."""
        check_process(self._pid, f"NVMe tier ({self.file.path})")
        with self._lock:
            futures = [f for s in self._pending.values() for f in s]
        wait_all(futures)

    def close(self) -> None:
        """Wait for the I/O in flight, stop the backend this tier made, close and remove the
        file (unless ``keep_file``). In a process forked from the tier's, only this process's
        copy of the descriptor is closed: the file and the I/O threads are the parent's."""
        if self.file.fd < 0 or os.getpid() != self._pid:
            self._finalizer.detach()
            if self.file.fd >= 0:
                fd, self.file.fd = self.file.fd, -1
                os.close(fd)  # the parent's descriptor (and its flock) stay
            return
        try:
            self.flush()
        finally:
            try:
                self.backend.close()
            finally:
                self._finalizer.detach()
                close_swap_file(self.file, self.config.keep_file)


def _discard(swap: SwapFile, keep: bool, backend: IOBackend | None, pid: int) -> None:
    """The finalizer of a tier never closed: stop the backend it made (nothing of the tier's
    is in flight: a request in flight holds the tier), then close and remove its file. In a
    forked child (at its exit, say) it does nothing: the file is the parent's."""
    if os.getpid() != pid:
        return
    try:
        if backend is not None:
            backend.close()
    except Exception:  # noqa: BLE001 - a finalizer must not raise
        pass
    try:
        close_swap_file(swap, keep)
    except OSError:
        pass
