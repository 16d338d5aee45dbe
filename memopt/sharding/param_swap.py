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
- failures (``param_swap_units``): a failed read leaves the unit on the tier (its storage
  freed again; a failed read-ahead is simply read again on demand); a failed or refused write
  keeps the unit in memory, marked dirty, and its next eviction writes it first. Each
  failure is raised once, as a ``ShardIOError`` (an ``OSError``, same errno) naming the unit,
  the file and the fix; nothing stays queued, so the swapper keeps working once the cause is
  fixed, and ``close()`` after a failed write neither raises it again nor keeps the file.

Everything goes through ``StorageTier`` handles; on an accelerator the tier bounces NVMe
through pinned host memory into the device storage. ``stats`` counts reads (and how many
were started ahead of their unshard), writes and bytes.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from torch import nn

from memopt.offload.allocator import round_up
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.state_store import trim_arena
from memopt.offload.tier import StorageTier
from memopt.sharding.fsdp2_internals import check_fsdp2_internals, fsdp_groups
from memopt.sharding.param_swap_hooks import set_guards
from memopt.sharding.param_swap_units import ShardIOError, SwapStats, Unit, UnitIO, storages
from memopt.sharding.unit_errors import unit_names

__all__ = ["ParamSwapper", "ShardIOError", "SwapStats", "make_param_swapper"]

_TRACE_CAP = 1 << 14  # entries of the recorded cycle (a run that never steps stops recording)


class ParamSwapper(UnitIO):
    """Keeps the stage-3 shards of ``model``'s FSDP2 units on ``tier``; see the module doc."""

    def __init__(self, model: nn.Module, tier: StorageTier, lookahead: int = 1) -> None:
        self.tier, self.lookahead = tier, lookahead
        self.stats = SwapStats()
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.units = [Unit(i, g) for i, g in enumerate(fsdp_groups(model))]
        self._trace: list[int] = []
        self._recording, self._cursor = True, 0
        self._stepping = False  # between begin_step and drain: a load is for an update
        self._hooks: list[Any] = []
        self._guarding = False  # see guard_evicted
        for u in self.units:
            u.name = unit_names(
                [[self._names.get(id(f.sharded_param), "") for f in u.group.fsdp_params]]
            )[0]
            refused = self._register(u, storages(u.group))
            if refused is not None:
                raise refused
        failed = [e for e in (self._settle_writes(u) for u in self.units) if e is not None]
        if failed:  # before any hook is installed
            raise failed[0]
        for u in self.units:
            self._wrap(u)
            self._evict(u)
        self._hook_state_dicts(model)

    def _evict(self, u: Unit) -> None:
        """Free the unit's storages once its I/O in flight is done. A failed write in flight
        is raised (the unit stays in memory). A dirty unit (an earlier write failed, or the
        step loaded it and did not write it back) is written first and freed only once that
        write landed; if it fails again it stays in memory, quietly (already reported)."""
        if not u.resident or u.pins:
            return
        self._finish_reads(u)  # a failed read ahead: the unit is back on the tier already
        err = self._settle_writes(u)
        if err is not None:
            self._fail(err, "write", u)
        if u.dirty and (
            self._write_pieces(u, [p for p in u.pieces if p.dirty]) is not None
            or self._settle_writes(u) is not None
        ):
            return
        if u.resident:
            self._drop(u)

    def guard_evicted(self) -> None:
        """From now on an evicted unit's sharded parameters raise a clear error from
        ``to_local()`` instead of exposing storage with no bytes (``param_swap_hooks``).
        ``memopt.shard`` turns it on once the optimizer has taken its views."""
        self._guarding = True
        for u in self.units:
            if not u.resident:
                set_guards(u.group, self._names, True)

    def load(self, index: int) -> None:
        """Make unit ``index`` resident (reading it if needed) and wait for its bytes. A read
        started ahead that failed is started again here; a failure of this read is raised
        (``ShardIOError``) and leaves the unit on the tier. Inside a step (``begin_step`` to
        ``drain``) the unit is marked dirty: the step updates it in place."""
        u = self.units[index]
        if u.reads:
            self._finish_reads(u)
        try:
            self._start_read(u, ahead=False)
        except OSError as refused:
            self._fail(refused, "read", u)
        failed = self._finish_reads(u)
        if failed is not None:
            self._fail(failed, "read", u)
        if self._stepping:
            for piece in u.pieces:
                piece.dirty = True

    def prefetch(self, index: int) -> None:
        """Start reading unit ``index`` (no wait). A read the tier refuses is not raised here:
        the unit stays on the tier, and its ``load`` reads it (and raises)."""
        with suppress(OSError):
            self._start_read(self.units[index], ahead=True)

    def write_back(self, index: int, evict: bool = True) -> None:
        """Write the unit's (updated) shards to the tier; evict it once written, unless it is
        needed again within the lookahead window. A refused write raises (the unit stays in
        memory, dirty); a unit not in memory has nothing to write."""
        u = self.units[index]
        err = self._finish_reads(u)
        if err is not None:
            self._fail(err, "read", u)
        if not u.resident:
            return
        err = self._write_pieces(u, u.pieces)
        if err is not None:
            self._fail(err, "write", u)
        if evict:
            self._release(u)

    def release(self, index: int) -> None:
        """Evict unit ``index`` once its writes land, unless it is needed within the window."""
        self._release(self.units[index])

    def _release(self, u: Unit) -> None:
        if u.index in self._window():
            self.stats.kept += 1
            return
        self._evict(u)

    def drain(self) -> None:
        """Wait for every read and write in flight (a failed read puts its unit back on the
        tier; a failed write leaves its unit in memory, dirty) and end the step; raise the
        first write error. Then hand the staging arena's empty chunks back to the kernel
        (between steps nothing is in flight)."""
        self._stepping = False
        failed: tuple[BaseException, Unit] | None = None
        try:
            for u in self.units:
                if u.reads:
                    self._finish_reads(u)
                err = self._settle_writes(u)
                if err is not None and failed is None:
                    failed = (err, u)
        finally:
            trim_arena(self.tier)
        if failed is not None:
            self._fail(failed[0], "write", failed[1])

    # -- the FSDP2 hooks ------------------------------------------------------------------
    def _wrap(self, u: Unit) -> None:
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
            refused = self._register(u, storages(group))  # lazy_init may re-pad a shard
            if refused is not None:
                self._fail(refused, "write", u)
            self._evict(u)

        group.unshard, group.wait_for_unshard, group.lazy_init = unshard_hook, wait_hook, lazy_hook

    def _unwrap(self, u: Unit) -> None:
        for name in ("unshard", "wait_for_unshard", "lazy_init"):
            u.group.__dict__.pop(name, None)  # the class's own methods again

    def _on_gather(self, u: Unit) -> None:
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
        """The optimizer step ends a cycle: stop recording, rewind the cursor. Until ``drain``
        each loaded unit counts as dirty (it is updated in place, then written back)."""
        self._recording, self._cursor, self._stepping = False, 0, True

    # -- whole-model residency --------------------------------------------------------------
    @contextmanager
    def resident(self, write_back: bool = True) -> Iterator[None]:
        """Every unit resident inside (e.g. to read or edit the parameters); on exit the
        shards are written back (unless ``write_back=False``) and evicted. On exit every unit
        is unpinned and released even if a write fails; the first failure is raised then."""
        self._pin_all()
        try:
            yield
        finally:
            errors: list[OSError] = []
            for u in self.units:
                u.pins -= 1
            for u in self.units:
                try:
                    if write_back:
                        self.write_back(u.index, evict=False)
                    self._release(u)
                except OSError as err:
                    errors.append(err)
            if errors:
                raise errors[0]

    def _pin_all(self) -> None:
        """Every unit resident (all reads started first, then waited on) and pinned; if a
        read fails, nothing stays pinned (the units loaded so far are released again)."""
        for u in self.units:
            self.prefetch(u.index)
        pinned: list[Unit] = []
        try:
            for u in self.units:
                self.load(u.index)
                u.pins += 1
                pinned.append(u)
        except BaseException:
            for u in pinned:
                u.pins -= 1
            for u in self.units:
                with suppress(OSError):
                    self._release(u)
            raise

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
        """Bring every shard back into memory and free the tier (the swapper is done). A
        failed write is not raised here (its bytes are in memory, and the tier goes away); a
        failed read is, and leaves the swapper open (the shards are only on the tier): close
        again once the cause is fixed."""
        self._pin_all()  # (takes every guard away)
        self._guarding = self._stepping = False
        for u in self.units:
            self._settle_writes(u)
        for h in self._hooks:
            h.remove()
        self._hooks = []
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
    sizes = [sum(round_up(t.untyped_storage().nbytes(), 4096) for t in storages(g)) for g in groups]
    need = sum(sizes) + 2 * max(sizes, default=0)
    directory = f"{nvme.directory}/params"
    cfg = dataclasses.replace(
        nvme, directory=directory, capacity_bytes=round_up(max(need, 4096), 4096),
        rank=rank if nvme.rank is None else nvme.rank,
    )  # fmt: skip
    on_cpu = all(t.device.type == "cpu" for g in groups for t in storages(g))
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
