"""Stage-3 parameter shards on NVMe (ZeRO-Infinity's parameter offload, on FSDP2).

A rank's shards of one FSDP2 unit (one ``FSDPParamGroup``) are needed in host/device memory
only (1) while FSDP2 all-gathers them (``unshard`` -> ``wait_for_unshard``: forward, the
backward re-gather, FSDP2's own prefetches) and (2) during the unit's optimizer step. The
``ParamSwapper`` keeps every other unit's shards in an NVMe file:

- setup: each distinct storage behind the unit's sharded parameters (``_sharded_param_data``,
  the padded flat shard, and the ``DTensor`` local tensor that views it) gets one handle on an
  ``NVMeTier``; it is written once, then the storage is freed with
  ``untyped_storage().resize_(0)`` (FSDP2's own trick: every view stays valid, it just owns
  no bytes). Loading resizes the storage back and reads into it.
- gather: ``unshard`` and ``wait_for_unshard`` of every unit are wrapped per instance, so any
  path that gathers goes through the swapper. Before the all-gather reads the shard it is
  made resident; after ``wait_for_unshard`` (the copy-in is consumed: the current stream has
  waited on the all-gather) it is evicted again, clean (NVMe already holds those bytes).
  FSDP2's ``lazy_init`` (which compares storage pointers and re-pads a re-materialized shard)
  runs with the unit resident; storages it replaced are re-registered and written.
- prefetch: the units' load order is recorded until the first optimizer step (one cycle:
  every micro-batch's forward and backward). Later, when unit i is loaded, the reads of the
  next ``lookahead`` entries of the cycle start at once, overlapping unit i's compute; a unit
  that reappears within that window is kept resident instead of evicted and read again.
- step: ``FSDPOptimizer`` streams units: ``prefetch`` the next one, ``load`` this one, step,
  ``write_back`` (the updated shard goes to NVMe; the storage is freed once written).

Everything goes through ``StorageTier`` handles; on an accelerator the tier bounces NVMe
through pinned host memory into the device storage. ``stats`` counts reads (and how many
were started ahead of their unshard), writes and bytes.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from memopt.offload.allocator import round_up
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.state_store import trim_arena
from memopt.offload.tier import IOFuture, StorageTier, TierHandle, wait_all
from memopt.sharding.fsdp2_internals import check_fsdp2_internals, fsdp_groups
from memopt.sharding.param_swap_hooks import set_guards

__all__ = ["ParamSwapper", "SwapStats", "make_param_swapper"]

_TRACE_CAP = 1 << 14  # entries of the recorded cycle (a run that never steps stops recording)


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
class _Piece:
    tensor: Tensor  # any tensor over the storage (kept to reach the storage again)
    nbytes: int
    handle: TierHandle


@dataclass
class _Unit:
    index: int
    group: Any
    pieces: list[_Piece] = field(default_factory=list)
    resident: bool = True
    reads: list[IOFuture] = field(default_factory=list)
    writes: list[IOFuture] = field(default_factory=list)
    pins: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def _storages(group: Any) -> list[Tensor]:
    """One tensor per distinct, non-empty, non-meta storage behind the group's shards."""
    out: dict[int, Tensor] = {}
    for fp in group.fsdp_params:
        for t in (fp._sharded_param_data, fp.sharded_param._local_tensor):
            st = t.untyped_storage()
            if not t.is_meta and st.nbytes() > 0:
                out.setdefault(st.data_ptr(), t)
    return list(out.values())


def _bytes(t: Tensor) -> Tensor:
    """A uint8 tensor over all of ``t``'s storage."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))


class ParamSwapper:
    """Keeps the stage-3 shards of ``model``'s FSDP2 units on ``tier``; see the module doc."""

    def __init__(self, model: nn.Module, tier: StorageTier, lookahead: int = 1) -> None:
        self.tier, self.lookahead = tier, lookahead
        self.stats = SwapStats()
        self.units = [_Unit(i, g) for i, g in enumerate(fsdp_groups(model))]
        self._trace: list[int] = []
        self._recording, self._cursor = True, 0
        self._hooks: list[Any] = []
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._guarding = False  # see guard_evicted
        for u in self.units:
            self._register(u, _storages(u.group))
        wait_all([f for u in self.units for f in u.writes])  # before any hook is installed
        for u in self.units:
            self._wrap(u)
            self._evict(u)
        self._hook_state_dicts(model)

    # -- pieces and their I/O ---------------------------------------------------------------
    def _register(self, u: _Unit, tensors: list[Tensor]) -> None:
        """Handles for ``tensors``' storages (new ones are written; vanished ones freed)."""
        old = {p.tensor.untyped_storage().data_ptr(): p for p in u.pieces}
        pieces = []
        for t in tensors:
            piece = old.pop(t.untyped_storage().data_ptr(), None)
            if piece is None:
                nbytes = t.untyped_storage().nbytes()
                piece = _Piece(t, nbytes, self.tier.allocate(nbytes))
                self._write_piece(u, piece)
            pieces.append(piece)
        for piece in old.values():
            self.tier.free(piece.handle)
        u.pieces = pieces

    def _write_piece(self, u: _Unit, piece: _Piece) -> None:
        u.writes.append(self.tier.write_async(piece.handle, _bytes(piece.tensor)))
        self.stats.writes += 1
        self.stats.bytes_written += piece.nbytes

    def _start_read(self, u: _Unit, ahead: bool) -> None:
        if u.resident:
            return
        if self._guarding:
            set_guards(u.group, self._names, False)
        for piece in u.pieces:
            piece.tensor.untyped_storage().resize_(piece.nbytes)
            u.reads.append(self.tier.read_async(piece.handle, _bytes(piece.tensor)))
            self.stats.bytes_read += piece.nbytes
        u.resident = True
        self.stats.reads += 1
        self.stats.prefetched += int(ahead)

    def _evict(self, u: _Unit) -> None:
        """Free the unit's storages (after its reads and writes in flight finish)."""
        if not u.resident or u.pins:
            return
        wait_all(u.reads + u.writes)
        u.reads, u.writes = [], []
        for piece in u.pieces:
            piece.tensor.untyped_storage().resize_(0)
        u.resident = False
        if self._guarding:
            set_guards(u.group, self._names, True)

    def guard_evicted(self) -> None:
        """From now on an evicted unit's sharded parameters raise a clear error from
        ``to_local()`` instead of exposing storage with no bytes (``param_swap_hooks``).
        ``memopt.shard`` turns it on once the optimizer has taken its views."""
        self._guarding = True
        for u in self.units:
            if not u.resident:
                set_guards(u.group, self._names, True)

    @staticmethod
    def _wait_reads(u: _Unit) -> None:
        wait_all(u.reads)
        u.reads = []

    def load(self, index: int) -> None:
        """Make unit ``index`` resident (reading it if needed) and wait for its bytes."""
        u = self.units[index]
        self._start_read(u, ahead=False)
        self._wait_reads(u)

    def prefetch(self, index: int) -> None:
        """Start reading unit ``index`` (no wait)."""
        self._start_read(self.units[index], ahead=True)

    def write_back(self, index: int, evict: bool = True) -> None:
        """Write the unit's (updated) shards to the tier; evict it once written, unless it is
        needed again within the lookahead window."""
        u = self.units[index]
        self._wait_reads(u)
        for piece in u.pieces:
            self._write_piece(u, piece)
        if evict:
            self._release(u)

    def release(self, index: int) -> None:
        """Evict unit ``index`` once its writes land, unless it is needed within the window."""
        self._release(self.units[index])

    def _release(self, u: _Unit) -> None:
        if u.index in self._window():
            self.stats.kept += 1
            return
        self._evict(u)

    def drain(self) -> None:
        """Wait for every write in flight; raise the first error. Then hand the staging
        arena's empty chunks back to the kernel (between steps nothing is in flight)."""
        for u in self.units:
            wait_all(u.writes)
            u.writes = []
        trim_arena(self.tier)

    # -- the FSDP2 hooks ------------------------------------------------------------------
    def _wrap(self, u: _Unit) -> None:
        group = u.group
        unshard, wait, lazy = group.unshard, group.wait_for_unshard, group.lazy_init

        def unshard_hook(async_op: bool = False) -> None:
            if group._all_gather_result is None and not group.is_unsharded:
                self._on_gather(u)
            unshard(async_op)

        def wait_hook() -> None:
            wait()
            self._release(u)

        def lazy_hook() -> None:
            self.load(u.index)
            lazy()
            self._register(u, _storages(group))  # lazy_init may re-pad a shard
            self._evict(u)

        group.unshard, group.wait_for_unshard, group.lazy_init = unshard_hook, wait_hook, lazy_hook

    def _unwrap(self, u: _Unit) -> None:
        for name in ("unshard", "wait_for_unshard", "lazy_init"):
            u.group.__dict__.pop(name, None)  # the class's own methods again

    def _on_gather(self, u: _Unit) -> None:
        if self._recording:
            if len(self._trace) < _TRACE_CAP:
                self._trace.append(u.index)
        else:
            self._advance(u.index)
        if u.resident:
            self.stats.gather_hits += 1
        else:
            self.stats.gather_demand += 1
        self.load(u.index)
        for k in self._window():
            self.prefetch(k)

    def _advance(self, index: int) -> None:
        """Move the cycle cursor past the next occurrence of ``index`` (resynchronizing)."""
        trace, c = self._trace, self._cursor
        for start, stop in ((c, len(trace)), (0, c)):
            for j in range(start, stop):
                if trace[j] == index:
                    self._cursor = j + 1
                    return

    def _window(self) -> set[int]:
        if self._recording or not self.lookahead:
            return set()
        return set(self._trace[self._cursor : self._cursor + self.lookahead])

    def begin_step(self) -> None:
        """The optimizer step ends a cycle: stop recording, rewind the cursor."""
        self._recording, self._cursor = False, 0

    # -- whole-model residency --------------------------------------------------------------
    @contextmanager
    def resident(self, write_back: bool = True) -> Iterator[None]:
        """Every unit resident inside (e.g. to read or edit the parameters); on exit the
        shards are written back (unless ``write_back=False``) and evicted."""
        self._pin_all()
        try:
            yield
        finally:
            for u in self.units:
                u.pins -= 1
                if write_back:
                    self.write_back(u.index, evict=False)
            for u in self.units:
                self._release(u)

    def _pin_all(self) -> None:
        """Every unit resident (all reads started first, then waited on) and pinned."""
        for u in self.units:
            self.prefetch(u.index)
        for u in self.units:
            self.load(u.index)
            u.pins += 1

    def _hook_state_dicts(self, model: nn.Module) -> None:
        """``state_dict``: load, then clone each unit's entries and evict; ``load_state_dict``:
        load, then write back and evict (per unit, on the unit's own module)."""
        from memopt.sharding.param_swap_hooks import install_state_dict_hooks

        self._hooks = install_state_dict_hooks(self, model)

    def resident_bytes(self) -> int:
        """Bytes of shard storage held in memory now."""
        return sum(p.tensor.untyped_storage().nbytes() for u in self.units for p in u.pieces)

    def nbytes(self) -> int:
        """Bytes of shard storage this rank keeps on the tier."""
        return sum(u.nbytes for u in self.units)

    def close(self) -> None:
        """Bring every shard back into memory and free the tier (the swapper is done)."""
        self._pin_all()  # (takes every guard away)
        self._guarding = False
        self.drain()
        for h in self._hooks:
            h.remove()
        for u in self.units:
            self._unwrap(u)
            for piece in u.pieces:
                self.tier.free(piece.handle)
            u.pieces = []
        self.tier.close()


def make_param_swapper(
    model: nn.Module, nvme: NVMeConfig, rank: int, lookahead: int = 1
) -> ParamSwapper:
    """A ``ParamSwapper`` over an ``NVMeTier`` in ``<nvme.directory>/params`` (apart from an
    optimizer-state file in the same directory), preallocated to the rank's shard bytes plus
    room for the shadow slots of two units' writes in flight (``grow_bytes`` beyond that).

    The tier's bounce buffers (shards whose storage is not page-aligned, or on a device) come
    from an arena of its own that grows by one largest unit at a time, so they cost about the
    units in flight, not the shared arena's 256 MiB chunks; pinned only for a device."""
    groups = fsdp_groups(model)
    check_fsdp2_internals(groups, "memopt.shard(offload_params='nvme')")
    sizes = [
        sum(round_up(t.untyped_storage().nbytes(), 4096) for t in _storages(g)) for g in groups
    ]
    need = sum(sizes) + 2 * max(sizes, default=0)
    directory = f"{nvme.directory}/params"
    cfg = dataclasses.replace(
        nvme, directory=directory, capacity_bytes=round_up(max(need, 4096), 4096),
        rank=rank if nvme.rank is None else nvme.rank,
    )  # fmt: skip
    on_cpu = all(t.device.type == "cpu" for g in groups for t in _storages(g))
    arena = PinnedArena(
        ArenaConfig(chunk_bytes=max(sizes, default=0), pin="off" if on_cpu else "auto")
    )
    tier: NVMeTier | None = None
    try:
        tier = NVMeTier(cfg, arena=arena)
        return ParamSwapper(model, tier, lookahead)
    except OSError as err:
        if tier is not None:
            try:
                tier.close()
            except OSError:
                pass  # the error that matters is ``err``
        if err.errno == errno.ENOSPC:
            raise enospc_error(err, sum(sizes), directory) from err
        raise


def enospc_error(err: OSError, nbytes: int, where: str) -> OSError:
    """ENOSPC while placing the shards: one error naming the size, the place and the fix."""
    return OSError(
        errno.ENOSPC,
        f"memopt.shard(offload_params='nvme'): this rank's parameter shards ({nbytes} bytes) do "
        f"not fit in {where} ({err.strerror or err}); free space there or point param_nvme at "
        "a larger disk",
    )
