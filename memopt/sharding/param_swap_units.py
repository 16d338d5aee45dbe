"""The per-unit bookkeeping of ``ParamSwapper`` (``param_swap``) and its I/O error.

A ``Unit`` is one FSDP2 unit (``FSDPParamGroup``); a ``Piece`` is one storage behind its
sharded parameters, with one tier handle. What the flags mean:

- ``Unit.resident``: the storages hold bytes (reads may still be in flight, ``Unit.reads``).
  A failed read frees them again (the unit is back on the tier, whose copy is the truth).
- ``Piece.dirty``: memory holds bytes the tier lacks: a write of it failed or was refused,
  or the optimizer step loaded its unit to update it and has not written it back yet. A dirty
  piece's unit is never evicted without writing it first (``ParamSwapper._evict``).
- ``Unit.writes``: ``(piece, future)`` per write in flight; a write that lands makes its piece
  clean, one that fails leaves it dirty (its bytes stay in memory).

``shard_io_error`` turns a tier's ``OSError`` into one (same errno) that says which unit,
what the failure left, and what to do.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import Tensor

from memopt.offload.tier import IOFuture, StorageTier, TierHandle, settle
from memopt.sharding.param_swap_hooks import set_guards

__all__ = ["Piece", "ShardIOError", "SwapStats", "Unit", "UnitIO", "shard_io_error", "storages"]


@dataclass
class SwapStats:
    """Counters since setup. ``prefetched``: reads started ahead of need (by the cycle trace
    or the optimizer's pipeline); ``gather_hits``: unshards that found their unit resident or
    its read already in flight; ``gather_demand``: unshards that had to start the read."""

    reads: int = 0
    prefetched: int = 0
    gather_hits: int = 0
    gather_demand: int = 0
    writes: int = 0
    kept: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class Piece:
    tensor: Tensor  # any tensor over the storage (kept to reach the storage again)
    nbytes: int
    handle: TierHandle
    dirty: bool = False  # memory holds bytes the tier lacks (see the module doc)


@dataclass
class Unit:
    index: int
    group: Any
    name: str = "root"  # the module its parameters share, for messages
    pieces: list[Piece] = field(default_factory=list)
    resident: bool = True
    reads: list[IOFuture] = field(default_factory=list)
    writes: list[tuple[Piece, IOFuture]] = field(default_factory=list)
    pins: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    @property
    def dirty(self) -> bool:
        return any(p.dirty for p in self.pieces)


def storages(group: Any) -> list[Tensor]:
    """One tensor per distinct, non-empty, non-meta storage behind the group's shards."""
    out: dict[int, Tensor] = {}
    for fp in group.fsdp_params:
        for t in (fp._sharded_param_data, fp.sharded_param._local_tensor):
            st = t.untyped_storage()
            if not t.is_meta and st.nbytes() > 0:
                out.setdefault(st.data_ptr(), t)
    return list(out.values())


def as_bytes(t: Tensor) -> Tensor:
    """A uint8 tensor over all of ``t``'s storage."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))


class ShardIOError(OSError):
    """A failed read or write of one unit's parameter shards (``errno`` is the tier's);
    ``tier_error`` is the tier's own error, ``unit`` the unit's name."""

    tier_error: OSError | None = None
    unit: str = ""


def shard_io_error(err: OSError, op: str, unit: Unit, where: str) -> ShardIOError:
    """``err`` from ``op`` ("read" / "write") of ``unit``'s shards in the tier file ``where``."""
    if op == "read":
        left = (
            "Nothing changed: the shards stay on the tier as they were (not in memory), and "
            "the next use of the unit reads them again"
        )
    else:
        left = (
            "The shards stay in memory with their current values (nothing is lost) and are "
            "written again when the unit is next evicted or written back; close() needs no "
            "write"
        )
    fix = (
        "free space on that disk, or point param_nvme at a larger one"
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else "check the disk, or point param_nvme at another one"
    )
    new = ShardIOError(
        err.errno,
        f"memopt.shard(offload_params='nvme'): the {op} of the parameter shards of FSDP2 "
        f"unit {unit.name!r} (tier file {where}) failed: {err.strerror or err}. {left}. To "
        f"fix: {fix}",
    )
    new.tier_error, new.unit = err, unit.name
    return new


class UnitIO:
    """``ParamSwapper``'s reads and writes of unit pieces, and their failures (module doc)."""

    tier: StorageTier
    stats: SwapStats
    _names: dict[int, str]
    _guarding: bool

    def _register(self, u: Unit, tensors: list[Tensor]) -> BaseException | None:
        """Handles for ``tensors``' storages (new ones are written; vanished ones freed);
        returns the tier's refusal of a write, if any (that piece stays dirty)."""
        old = {p.tensor.untyped_storage().data_ptr(): p for p in u.pieces}
        pieces, new = [], []
        for t in tensors:
            piece = old.pop(t.untyped_storage().data_ptr(), None)
            if piece is None:
                nbytes = t.untyped_storage().nbytes()
                piece = Piece(t, nbytes, self.tier.allocate(nbytes))
                new.append(piece)
            pieces.append(piece)
        for piece in old.values():
            self.tier.free(piece.handle)
        u.pieces = pieces
        return self._write_pieces(u, new)

    def _write_pieces(self, u: Unit, pieces: list[Piece]) -> BaseException | None:
        """Start writing ``pieces``; one the tier refuses (no room) stays dirty, the others
        go on; the first refusal is returned."""
        first: BaseException | None = None
        for piece in pieces:
            try:
                fut = self.tier.write_async(piece.handle, as_bytes(piece.tensor))
            except OSError as err:
                piece.dirty, first = True, first or err
                continue
            u.writes.append((piece, fut))
            self.stats.writes += 1
            self.stats.bytes_written += piece.nbytes
        return first

    @staticmethod
    def _settle_writes(u: Unit) -> BaseException | None:
        """Wait for the unit's writes in flight, oldest first: a landed one makes its piece
        clean, a failed one leaves it dirty (its bytes stay in memory); the first error is
        returned (each failure is seen once: its future is gone afterwards)."""
        first: BaseException | None = None
        while u.writes:
            piece, fut = u.writes[0]
            try:
                fut.wait()
                piece.dirty = False
            except BaseException as err:  # noqa: BLE001 - returned to the caller
                if not fut.done():  # interrupted while waiting (Ctrl-C): still in flight
                    raise
                piece.dirty, first = True, first or err
            u.writes.pop(0)
        return first

    def _start_read(self, u: Unit, ahead: bool) -> None:
        if u.resident:
            return
        if self._guarding:
            set_guards(u.group, self._names, False)
        u.resident = True
        self.stats.reads += 1
        self.stats.prefetched += int(ahead)
        try:
            for piece in u.pieces:
                piece.tensor.untyped_storage().resize_(piece.nbytes)
                u.reads.append(self.tier.read_async(piece.handle, as_bytes(piece.tensor)))
                self.stats.bytes_read += piece.nbytes
        except BaseException:  # refused: back on the tier, nothing left in flight
            for fut in u.reads:
                settle(fut)
            u.reads = []
            self._drop(u)
            raise

    def _finish_reads(self, u: Unit) -> BaseException | None:
        """Wait for the unit's reads; if one failed, the unit goes back to the tier (whose
        copy is intact: a failed read changes nothing there) and the error is returned."""
        first: BaseException | None = None
        for fut in u.reads:
            try:
                fut.wait()
            except BaseException as err:  # noqa: BLE001 - returned to the caller
                if not fut.done():  # interrupted while waiting: the reads stay in flight
                    raise
                first = first or err
        u.reads = []
        if first is not None:
            self._drop(u)
        return first

    def _drop(self, u: Unit) -> None:
        """Free the unit's storages (the tier holds its bytes)."""
        for piece in u.pieces:
            piece.tensor.untyped_storage().resize_(0)
        u.resident = False
        if self._guarding:
            set_guards(u.group, self._names, True)

    def _fail(self, err: BaseException, op: str, u: Unit) -> NoReturn:
        """Raise ``err`` (an ``OSError`` as a ``ShardIOError`` naming unit, file and fix)."""
        if not isinstance(err, OSError):
            raise err
        file = getattr(getattr(self.tier, "file", None), "path", None) or self.tier.name
        raise shard_io_error(err, op, u, str(file)) from err
