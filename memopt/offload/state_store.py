"""Per-parameter optimizer state kept on a storage tier (pinned CPU or NVMe) between updates.

Shared by ``StateOffloadedOptimizer`` (stages 0-2: one parameter at a time around
``step_one``) and stage 3's ``FSDPOptimizer`` with ``offload=`` (one FSDP unit at a time).
``StateStore(inner, tier)`` works with any optimizer that keeps per-parameter state in
``inner.state[p]`` (torch's AdamW and Adam, every memopt optimizer): after parameters are
stepped, ``send`` writes each of their state tensors of at least
``min_bytes`` (moments, bases, 8-bit codes; not step counters) to the tier and leaves an
empty placeholder (at most ``max_writes`` writes in flight, each keeping its source alive);
``prefetch`` / ``fetch`` (started for the next parameters while these step) read them back
into fresh tensors before their next step; a tensor is put into ``inner.state[p]`` (and
stops counting as away) only once its read succeeded, so a failed or interrupted read leaves
the placeholder and the tier's copy as the truth, and a later fetch reads it again. A write
that fails puts its source tensor back into ``inner.state[p]`` (the key is resident again and
the next ``send`` writes it anew; the tier's stale copy is not read), and ``send`` / ``drain``
raise only once no write is in flight: a failed write loses no state. Each
(parameter, key) has one tier handle, reallocated only if the tensor's shape or dtype
changes. Host tensors are read back into page-aligned memory, so the NVMe tier moves them in
place (no bounce copy of their size, and no bounce memory held). ``fetch_all`` /
``send_all`` serve ``state_dict`` and ``load_state_dict``, which see the inner optimizer's
own layout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.tier import IOFuture, StorageTier, TierHandle

__all__ = ["StateStore", "trim_arena"]

Key = tuple[int, str]
_PAGE = 4096


def _aligned_empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An empty host tensor at a page-aligned address (a view 0-4095 bytes into a slightly
    larger buffer), so the NVMe tier reads and later writes it in place instead of staging
    it through a bounce buffer of its size; device tensors as usual."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = shape.numel() * dtype.itemsize
    buf = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
    skip = -buf.data_ptr() % _PAGE
    return buf[skip : skip + nbytes].view(dtype).view(shape)


def trim_arena(tier: StorageTier) -> None:
    """Unmap the empty chunks of ``tier``'s unpinned staging arena (an NVMe tier's bounce
    buffers; pinned arenas keep theirs: re-pinning every step would cost more)."""
    arena = getattr(tier, "arena", None)
    if isinstance(tier, NVMeTier) and arena is not None and arena.config.pin == "off":
        arena.trim()


class StateStore:
    """Per-parameter optimizer state on ``tier`` between steps; see the module docstring."""

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        tier: StorageTier,
        min_bytes: int = 4096,
        max_writes: int = 2,
    ) -> None:
        self.inner, self.tier = inner, tier
        self.min_bytes, self.max_writes = min_bytes, max_writes
        self._handles: dict[Key, TierHandle] = {}
        self._keys: dict[int, set[str]] = {}  # id(p) -> its keys with a handle
        self._away: dict[Key, tuple[torch.Size, torch.dtype, torch.device]] = {}
        # reads started, not yet seen to succeed: id(p) -> key -> (buffer, future)
        self._reads: dict[int, dict[str, tuple[Tensor, IOFuture]]] = {}
        # writes in flight: (parameter, key, source tensor, future), oldest first
        self._writes: deque[tuple[Tensor, str, Tensor, IOFuture]] = deque()
        self.bytes_read = self.bytes_written = 0  # moved to / from the tier since setup

    def prefetch(self, params: Iterable[Tensor]) -> None:
        """Start reading the state of ``params`` (no wait). Nothing changes in the optimizer's
        state or in the bookkeeping until ``fetch`` has seen a read succeed: a read that fails
        (or is interrupted) leaves the key on the tier, its placeholder in place."""
        for p in params:
            state = self.inner.state.get(p)
            if not state:
                continue
            pending = self._reads.setdefault(id(p), {})
            for key in [k for k in state if (id(p), k) in self._away and k not in pending]:
                shape, dtype, device = self._away[(id(p), key)]
                out = _aligned_empty(shape, dtype, device)
                pending[key] = (out, self.tier.read_async(self._handles[(id(p), key)], out))

    def fetch(self, params: Iterable[Tensor]) -> None:
        """The state of ``params`` resident (reads started if needed, then waited on). A key
        whose read failed stays on the tier (the next fetch reads it again); the first error
        is raised after every read finished."""
        params = list(params)
        self.prefetch(params)
        first: BaseException | None = None
        for p in params:
            pending = self._reads.get(id(p), {})
            for key, (out, fut) in list(pending.items()):
                try:
                    fut.wait()
                except BaseException as err:  # noqa: BLE001 - raised below, after the rest
                    if not fut.done():
                        first = first or err  # interrupted while waiting: keep the read
                        continue
                    first = first or err
                    del pending[key]
                    continue
                # every prefix of these three lines leaves a consistent store
                self.inner.state[p][key] = out
                self._away.pop((id(p), key), None)
                del pending[key]
                self.bytes_read += out.numel() * out.element_size()
            if not pending:
                self._reads.pop(id(p), None)
        if first is not None:
            raise first

    def send(self, params: Iterable[Tensor]) -> None:
        """Write the large state tensors of ``params`` to the tier; they shrink at once (the
        write keeps its source alive until it is done). On an error every write in flight is
        waited for first and each failed one's tensor is put back (see ``_settle``); the keys
        not yet written stay in memory."""
        for p in params:
            state = self.inner.state.get(p, {})
            self._free_dropped(p, state)
            for key, t in list(state.items()):
                if not isinstance(t, Tensor) or t.numel() * t.element_size() < self.min_bytes:
                    continue
                if (id(p), key) in self._away:  # still on the tier (its read failed)
                    continue
                src = t.detach().contiguous()
                try:  # refused (no room): nothing changed for this key
                    fut = self.tier.write_async(self._handle((id(p), key), t), src)
                except BaseException:
                    self._settle_all(raise_first=False)
                    raise
                self.bytes_written += src.numel() * src.element_size()
                self._away[(id(p), key)] = (t.shape, t.dtype, t.device)
                state[key] = t.new_empty(0)
                self._writes.append((p, key, src, fut))
                while len(self._writes) > self.max_writes:
                    error = self._settle(self._writes.popleft())
                    if error is not None:
                        self._settle_all(raise_first=False)
                        raise error

    def _settle(self, write: tuple[Tensor, str, Tensor, IOFuture]) -> BaseException | None:
        """Wait for one write; if it failed, put its source back as the key's state (resident
        again: nothing is lost, the next ``send`` writes it) and return the error."""
        p, key, src, fut = write
        try:
            fut.wait()
            return None
        except BaseException as err:  # noqa: BLE001 - returned to the caller, which raises it
            if not fut.done():  # interrupted while waiting (Ctrl-C): still in flight
                self._writes.appendleft(write)
                raise
            state = self.inner.state.get(p)
            if state is not None and self._away.pop((id(p), key), None) is not None:
                state[key] = src
                self.bytes_written -= src.numel() * src.element_size()
            return err

    def _settle_all(self, raise_first: bool = True) -> None:
        """``_settle`` every write in flight, oldest first; then raise the first error."""
        first: BaseException | None = None
        while self._writes:
            error = self._settle(self._writes.popleft())
            first = first or error
        if first is not None and raise_first:
            raise first

    def _free_dropped(self, p: Tensor, state: dict[str, Any]) -> None:
        """Free the tier room of state the optimizer dropped since its last send (FRUGAL's
        block mode drops an inactive tensor's moments: their handles stayed allocated, and
        after one rotation the tier held full AdamW state)."""
        keys = self._keys.get(id(p))
        for key in [k for k in keys or () if k not in state]:
            self.tier.free(self._handles.pop((id(p), key)))
            self._away.pop((id(p), key), None)
            keys.discard(key)  # type: ignore[union-attr]

    def _handle(self, key: Key, t: Tensor) -> TierHandle:
        h = self._handles.get(key)
        if h is not None and (h.shape != tuple(t.shape) or h.dtype != t.dtype):
            self.tier.free(h)
            h = None
        if h is None:
            h = self._handles[key] = self.tier.allocate(tuple(t.shape), t.dtype)
            self._keys.setdefault(key[0], set()).add(key[1])
        return h

    def drain(self) -> None:
        """Wait for the writes in flight (a failed one's tensor is put back, see ``_settle``;
        the first error is raised after all of them); then unmap the tier arena's empty
        chunks."""
        try:
            self._settle_all()
        finally:
            trim_arena(self.tier)

    def all_params(self) -> list[Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"]]

    def fetch_all(self) -> None:
        self.drain()
        self.fetch(self.all_params())

    def send_all(self) -> None:
        self.send(self.all_params())
        self.drain()

    def resident_bytes(self) -> int:
        """Bytes of state tensors held in memory now (not on the tier), the buffers of reads
        in flight included."""
        held = [t for st in self.inner.state.values() for t in st.values()]
        held += [out for pending in self._reads.values() for out, _ in pending.values()]
        return sum(t.numel() * t.element_size() for t in held if isinstance(t, Tensor))

    def close(self, close_tier: bool = True) -> None:
        """Bring the state back into memory, free its handles and (``close_tier``) the tier."""
        self.fetch_all()
        for h in self._handles.values():
            self.tier.free(h)
        self._handles.clear()
        self._keys.clear()
        if close_tier:
            self.tier.close()
