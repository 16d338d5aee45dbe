"""The ``StorageTier`` interface every offload tier implements, and its handles and futures.

A tier stores byte ranges for its users. ``allocate`` reserves room for one tensor and returns
a ``TierHandle``; ``write_async(handle, tensor)`` copies a tensor in and ``read_async(handle,
out)`` copies it back out, both returning an ``IOFuture`` whose ``wait()`` blocks until the
copy is done and raises a fresh copy of any exception the background work hit (an ``OSError``
keeps its ``errno``, so callers can tell ENOSPC from EIO); ``free`` gives the room back;
``report`` says how many bytes were requested, how many are reserved (requests plus
alignment), and how many of those are pinned (page-locked) in host memory.

The same interface serves optimizer state, parameter shards, swapped activations and
checkpoint staging, so one tier object (and one report) sees all bytes of its kind.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import contextlib
import copy
import errno
import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

_IDS = itertools.count(1)
T = TypeVar("T")


@dataclass(frozen=True)
class TierHandle:
    """Room for one tensor on one tier. ``shape``/``dtype`` are None for a raw byte request."""

    tier: str
    key: int
    nbytes: int
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class TierReport:
    """Bytes a tier holds. ``reserved >= requested``; ``pinned <= reserved`` for host tiers."""

    requested_bytes: int
    reserved_bytes: int
    pinned_bytes: int
    capacity_bytes: int
    live_handles: int


def request_nbytes(
    nbytes_or_shape: int | Sequence[int], dtype: torch.dtype | None
) -> tuple[int, tuple[int, ...] | None]:
    """``allocate``'s argument as (nbytes, shape): an int is bytes unless a dtype is given."""
    if isinstance(nbytes_or_shape, int) and dtype is None:
        if nbytes_or_shape < 0:
            raise ValueError(f"allocate: nbytes must be >= 0, got {nbytes_or_shape}")
        return nbytes_or_shape, None
    shape = (nbytes_or_shape,) if isinstance(nbytes_or_shape, int) else tuple(nbytes_or_shape)
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"allocate: shape {shape} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype or torch.uint8).element_size()
    return math.prod(shape) * itemsize, tuple(int(s) for s in shape)


def new_handle(tier: str, nbytes: int, shape: tuple[int, ...] | None, dtype: torch.dtype | None):
    """A handle with a process-unique key."""
    return TierHandle(tier=tier, key=next(_IDS), nbytes=nbytes, shape=shape, dtype=dtype)


class IOFuture:
    """One tier operation, possibly made of several background pieces.

    ``wait()`` returns when every piece has finished and raises the first piece's exception,
    if any (after all pieces are done, so no buffer is still in use when it raises).
    ``on_done`` callbacks run once, in whichever thread finishes last, with the exception
    (or None); tiers use them to commit an offset-table entry or release a bounce buffer.
    """

    def __init__(
        self,
        pieces: Sequence[cf.Future] = (),
        describe: str = "tier I/O",
        keep_alive: object = None,
    ) -> None:
        self._pieces = list(pieces)
        self._describe = describe
        self._lock = threading.Lock()
        self._pending = len(self._pieces)
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[BaseException | None], None]] = []
        # Buffers the pieces use, held until they are done. Set here, before the callbacks
        # below: set after them, a piece that finished first would find nothing to release
        # and the assignment would then hold the buffer for the future's lifetime.
        self.keep_alive: object = keep_alive
        if not self._pieces:
            self._done.set()
        for piece in self._pieces:
            piece.add_done_callback(self._piece_done)

    @classmethod
    def completed(cls, error: BaseException | None = None, describe: str = "tier I/O"):
        fut = cls(describe=describe)
        fut._error = error
        return fut

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        """Run ``fn(error_or_None)`` when all pieces finish (now, if they already have)."""
        with self._lock:
            if self._pending:
                self._callbacks.append(fn)
                return
        fn(self._error)

    def _piece_done(self, piece: cf.Future) -> None:
        err = piece.exception()
        with self._lock:
            if err is not None and self._error is None:
                self._error = err
            self._pending -= 1
            if self._pending:
                return
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self._error)
            except BaseException as cb_err:  # noqa: BLE001 - kept and raised from wait()
                if self._error is None:
                    self._error = cb_err
        # Done: let go of the pieces (each holds a bound method of this future: a reference
        # cycle), the callbacks (closures over this future) and the buffers, so a finished
        # future and the tensors it kept alive are freed by reference counting at once, not at
        # the next cyclic garbage collection (which held hundreds of MiB of stage-3 state).
        self._pieces, self.keep_alive = [], None
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; raise the background exception in the caller's thread.

        Each call raises a fresh copy (same type, args and ``errno``) chained from the stored
        exception, never the stored object itself: raising an object attaches the caller's
        traceback to it, and the future would then keep every frame of that call alive (the
        backward that waited, the loss, the whole autograd graph, through C++ nodes the
        garbage collector cannot follow: a swapped activation's failed read leaked its graph
        that way, once per failed step)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self._describe}: not finished after {timeout} s")
        err = self._error
        if err is not None:
            raise _fresh_copy(err, self._describe) from err


def _fresh_copy(err: BaseException, describe: str) -> BaseException:
    """A new exception like ``err`` (type, args, attributes; no traceback, cause or context),
    or a RuntimeError naming it when its type cannot be rebuilt from its args."""
    try:
        new = copy.copy(err)
    except Exception:  # noqa: BLE001 - a type whose __init__ does not take its own args
        new = None
    if type(new) is not type(err) or new is err:
        return RuntimeError(f"{describe} failed: {type(err).__name__}: {err}")
    new.__traceback__ = new.__cause__ = new.__context__ = None
    return new


def once_fixed(err: OSError) -> str:
    """When a failed tier operation may be redone, for the error messages: a full disk needs
    room; any other error (EIO, a lost device) its cause fixed or the tier moved."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "once the tier has room"
    return "once the cause above is fixed (check the disk, or move the tier)"


def wait_all(futures: Sequence[IOFuture]) -> None:
    """Wait for every future, then raise the first error (none is left running)."""
    first: BaseException | None = None
    for fut in futures:
        try:
            fut.wait()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            first = first or err
    if first is not None:
        raise first


def settle(fut: IOFuture) -> None:
    """Wait until ``fut`` is done, ignoring its error and any Ctrl-C meanwhile: for a caller
    already raising (a Ctrl-C) that is about to free the buffer the transfer uses."""
    while not fut.done():
        with contextlib.suppress(BaseException):  # the caller raises the first error
            fut.wait()


class StorageTier(abc.ABC):
    """Allocate / write_async / read_async / free over one kind of storage."""

    name: str = "tier"

    @abc.abstractmethod
    def allocate(
        self, nbytes_or_shape: int | Sequence[int], dtype: torch.dtype | None = None
    ) -> TierHandle:
        """Reserve room for ``nbytes`` bytes, or for a tensor of ``shape`` and ``dtype``."""

    @abc.abstractmethod
    def write_async(self, handle: TierHandle, tensor: torch.Tensor) -> IOFuture:
        """Copy ``tensor`` (exactly ``handle.nbytes`` bytes) into the handle's room."""

    @abc.abstractmethod
    def read_async(self, handle: TierHandle, out: torch.Tensor) -> IOFuture:
        """Copy the handle's bytes into ``out`` (exactly ``handle.nbytes`` bytes)."""

    @abc.abstractmethod
    def free(self, handle: TierHandle) -> None:
        """Give the handle's room back (waits for its operations still in flight)."""

    @abc.abstractmethod
    def report(self) -> TierReport:
        """Requested / reserved / pinned bytes now held."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything the tier holds; the default does nothing."""

    def check_usable(self) -> None:  # noqa: B027 - optional hook
        """Raise a RuntimeError saying why, if this tier cannot be used now (closed, or
        inherited by a forked process); the default accepts."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_io_tensor(handle: TierHandle, tensor: torch.Tensor, what: str) -> None:
    """A clear error when a tensor cannot be copied to or from ``handle``."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes != handle.nbytes:
        raise ValueError(
            f"{what}: tensor has {nbytes} bytes ({tuple(tensor.shape)} {tensor.dtype}) but "
            f"handle {handle.key} on {handle.tier!r} holds {handle.nbytes}; allocate a handle "
            "of the tensor's size"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous (call .contiguous() first)")


def live_entry(table: dict[int, T], handle: TierHandle, tier: str) -> T:
    """``table[handle.key]``, or a ValueError saying the handle is not live on ``tier``."""
    try:
        return table[handle.key]
    except KeyError:
        raise ValueError(
            f"handle {handle.key} ({handle.tier!r}) is not live on this {tier} tier "
            "(freed, or allocated on another tier)"
        ) from None


def check_process(owner_pid: int, what: str) -> None:
    """A RuntimeError when called in a process other than ``owner_pid`` (a child made by
    ``os.fork``, a DataLoader worker): the object's I/O threads exist only in the process
    that made it, so a request made here would never finish."""
    pid = os.getpid()
    if pid != owner_pid:
        raise RuntimeError(
            f"this {what} was made in process {owner_pid} and inherited by fork into process "
            f"{pid}: its I/O threads exist only in the parent, so it cannot be used here (its "
            "requests would never finish). Make a new one in this process (memopt objects "
            "made after the fork work), or start the child with the 'spawn' method"
        )
