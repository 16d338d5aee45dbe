"""A swapped storage: ``SwapRecord`` (its bytes on a tier, fetched back for the backward) and
``SwappedTensor`` (the packed form of one saved tensor: a record plus how to rebuild the view).

A record copies the storage's bytes into a generation-checked ``Slot`` when it is made (on
CUDA on a side stream, the device source held and counted under ``"device"`` until the copy's
event or the tier future completes); ``prefetch()`` starts the copy back; ``restore()`` waits
for it and rebuilds the saved view (dtype, size, stride, offset, conjugate and negative bits).
Every ``SwappedTensor`` holds one reference; when autograd drops the last one, ``release()``
gives the slot, the fetched buffer and (once its copy out is done) the source back through
``SwapEngine.retire`` (``swap.py``), which defers whatever a copy in flight still uses.

A tier error (an NVMe write or read that failed) seen by ``prefetch()``/``materialize()``
frees the slot, buffers and ledger bytes at once (the graph, or an exception the caller keeps,
may hold the record much longer) and raises an ``OSError`` naming the block and what to do;
every later use raises it again.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch

from memopt.activations.hooks import check_version
from memopt.activations.ledger import Token
from memopt.activations.transfer import Pending, Slot

if TYPE_CHECKING:
    from memopt.activations.swap import SwapEngine

__all__ = ["SwapRecord", "SwappedTensor"]

_PLACE = {"cpu": "host", "nvme": "nvme"}


class SwapRecord:
    """One storage's bytes on a tier, and (after a fetch) back on the device."""

    def __init__(self, engine: SwapEngine, src: torch.Tensor, slot: Slot, block: str) -> None:
        self.engine, self.slot, self.block = engine, slot, block
        self.device = src.device
        self.version = -1  # the in-place version of the tensor whose bytes were copied
        self._lock = threading.RLock()  # prefetch() reaps under it
        self._refs = 0
        self._released = False
        self._fetched: torch.Tensor | None = None
        self._fetch_pending: Pending | None = None
        self._adopted = False
        self._dev_token: Token | None = None
        self._failure: tuple[int | None, str] | None = None  # (errno, message) of a tier error
        self._src: torch.Tensor | None = src
        self._src_token: Token | None = engine.ledger.hold(src, place="device", block=block)
        self._host_token: Token | None = engine.ledger.hold_bytes(
            slot.nbytes, key=("slot", slot.generation), place=_PLACE[slot.tier], block=block
        )
        try:
            self._out_pending = engine.write(slot, src)
        except BaseException:  # refused at submit (a full NVMe file): no record, no holds
            self.drop_source()
            self._host_token.release()
            self._host_token = None
            raise
        self.reap()

    def reap(self) -> bool:
        """Drop the device source once its copy out finished; True when nothing is in flight."""
        with self._lock:
            if self._src is None:
                return True
            if not self._out_pending.done():
                return False
            self.drop_source()
            return True

    def drop_source(self) -> None:
        """Let go of the device source and its ledger hold (the caller knows the copy out
        finished: a tier future's done-callback runs before ``done()`` reports it)."""
        with self._lock:
            self._src = None
            token, self._src_token = self._src_token, None
        if token is not None:
            token.release()

    def prefetch(self) -> None:
        """Start the copy back to the device (idempotent; returns without waiting).

        Raises ``OSError`` (see ``_fail``) when the tier failed the copy out or refuses the
        copy back."""
        with self._lock:
            if self._fetched is not None or self._released:
                return
            self._raise_failure()
            self.engine.pool.check(self.slot)
            try:
                if self.slot.tier == "nvme":
                    self._out_pending.wait_host()  # the file must hold the bytes first
                    self.reap()  # the copy out is done: drop the device source before reading
            except OSError as err:
                failed, action = err, "written to"
            else:
                try:
                    buf, pending = self.engine.read(self.slot, self.device)
                except OSError as err:
                    failed, action = err, "read back from"
                else:
                    self._fetched, self._fetch_pending = buf, pending
                    self._dev_token = self.engine.ledger.hold(buf, place="device", block=self.block)
                    return
        raise self._fail(failed, action) from failed

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
            if self._adopted:
                return buf
            try:
                pending.wait_stream()
            except OSError as err:
                failed = err
            else:
                self.engine.backend.adopt(buf)
                self._adopted = True
                return buf
        raise self._fail(failed, "read back from") from failed

    def _fail(self, err: OSError, action: str) -> OSError:
        """The tier failed this record's bytes: they are lost, and so is the backward that
        needs them. Give back the slot, the fetched buffer, the device source and their ledger
        bytes now (the graph, or an exception the caller keeps, may hold the record for long),
        remember why, and return the error to raise (again at every later use)."""
        with self._lock:
            if self._failure is None:
                detail = err.strerror if err.strerror else str(err)
                if err.filename is not None:
                    detail += f": {err.filename!r}"
                self._failure = (err.errno, (
                    f"swapped activation of block {self.block!r} ({self.slot.nbytes} bytes) "
                    f"could not be {action} the {self.slot.tier!r} tier: {detail}. This step's "
                    "saved activations are lost, so its backward cannot finish: zero the "
                    "gradients (optimizer.zero_grad(): the blocks after this one already added "
                    "theirs to .grad) and redo the forward; if the error repeats, check the "
                    "disk of ActivationOptions.nvme's directory (free space, I/O errors) or "
                    "swap this block with tier='cpu'"
                ))
            self._fetched, self._fetch_pending = None, None
            tokens = (self._dev_token, self._host_token)
            self._dev_token = self._host_token = None
        for tok in tokens:
            if tok is not None:
                tok.release()
        if self._out_pending.done():  # else release() frees them once the copy out ends
            self.drop_source()
            self.engine.pool.free(self.slot)
        return self._failure_error()

    def _failure_error(self) -> OSError:
        assert self._failure is not None
        code, msg = self._failure
        return OSError(code, msg) if code is not None else OSError(msg)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure_error()

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
