"""The ``swap`` policy's trace: ``trace_step`` with ``memopt.activations``' swap played on meta.

The estimate of ``activation_policy="swap"`` is the live bytes of a meta forward and backward
in which every repeated block (``find_blocks``) is swapped as ``memopt.activations`` swaps it
(``swap.py``, ``swaprecord.py``, ``prefetch.py``), with its default ``ActivationOptions``:

- forward: in a block, a saved storage of at least ``min_swap_bytes`` (4 KiB) that is not a
  parameter, buffer or gradient goes to the pinned host tier once per block call (a later
  save of the same storage at the same in-place version reuses it); smaller saves stay on
  the device. The packed form keeps no reference to the storage, so its device bytes go
  when the forward lets go of the tensor. On a CPU device the copy is synchronous; on CUDA
  it runs on a side stream and the record keeps its source until a poll finds the copy done:
  a block's sources go at the end of the next block's forward (its poll), the last block's
  at its backward's first unpack, after its own fetch-back (the planner's cost model calls
  these ``unreaped`` / ``unreaped_at_fetch``);
- backward: a hook on a block's outputs fires when their gradient is ready, before the
  block's own backward, and fetches back (a new device buffer per swapped storage) that
  block's storages and those of the ``prefetch_depth`` (1) blocks before it whose backward
  has not started; a fetched buffer lives until autograd drops the last saved tensor that
  uses it (right after the node that read it). So during the head's and the loss's backward
  no block is on the device, during block k's backward blocks k and k-1 are (less what k's
  nodes already released).

The pinned figure is the most swapped bytes held on the host at once (the arena's requested
bytes). ``tests/memory/test_swap_estimate.py`` checks the result against a measured run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

from memopt.memory.trace import ActivationTrace, TracedStep, _Live, fused_attention

__all__ = ["MIN_SWAP_BYTES", "PREFETCH_DEPTH", "SwapTrace", "trace_swap"]

#: memopt.activations.ActivationOptions' defaults (layer 3: restated; tests pin them equal)
MIN_SWAP_BYTES = 4096
PREFETCH_DEPTH = 1


@dataclass(frozen=True)
class SwapTrace(ActivationTrace):
    """An ``ActivationTrace`` of the swap policy: device bytes, and the host tier's peak."""

    pinned_peak: int = 0  # the most swapped bytes on the pinned host tier at once


class _Record:
    """One swapped storage: its host bytes, its unreaped device source, its fetched copy."""

    def __init__(self, state: _State, nbytes: int, version: int, source: Tensor | None) -> None:
        self.state, self.nbytes, self.version, self.source = state, nbytes, version, source
        self.refs = 0
        self.released = False
        self.fetched: Tensor | None = None

    def fetch(self) -> None:
        if self.fetched is None and not self.released:
            self.fetched = torch.empty(self.nbytes, dtype=torch.uint8, device="meta")
            self.state.live.add(self.fetched, "act")  # (made under the mode: as "tmp" in
            self.state.live.regrade(self.fetched, "act")  # the backward) an activation

    def release(self) -> None:
        self.refs -= 1
        if self.refs > 0 or self.released:
            return
        self.released = True
        self.fetched = self.source = None
        self.state.host -= self.nbytes


class _Packed:
    """A swapped saved tensor: its record and how to rebuild the view from the fetched bytes."""

    def __init__(self, record: _Record, t: Tensor) -> None:
        record.refs += 1
        self.record = record
        self.dtype, self.size, self.stride = t.dtype, t.size(), t.stride()
        self.offset = int(t.storage_offset())

    def unpack(self) -> Tensor:
        self.record.fetch()
        buf = self.record.fetched
        assert buf is not None, "a swapped tensor was unpacked after its release"
        out = torch.empty(0, dtype=self.dtype, device="meta")
        return out.set_(buf.untyped_storage(), self.offset, self.size, self.stride)

    def __del__(self) -> None:
        self.record.release()


class _Run:
    """One forward call of one block: what it swapped, and the run before it."""

    def __init__(self, index: int, prev: _Run | None) -> None:
        self.index, self.prev = index, prev
        self.records: list[_Record] = []
        self.seen: dict[int, tuple[StorageWeakRef, _Record]] = {}
        self.started = False

    def fetch(self) -> None:
        for r in self.records:
            r.fetch()


class _State:
    def __init__(self, live: _Live, cuda: bool, min_bytes: int, depth: int) -> None:
        self.live, self.cuda, self.min_bytes, self.depth = live, cuda, min_bytes, depth
        self.host = self.host_peak = 0
        self.run: _Run | None = None  # the block running its forward now (None: outside)
        self.last: _Run | None = None
        self.unreaped: list[tuple[int, _Record]] = []

    def swap(self, t: Tensor, nbytes: int) -> _Packed:
        run = self.run
        assert run is not None
        key = t.untyped_storage()._cdata
        hit = run.seen.get(key)
        rec = None if hit is None or hit[0].expired() else hit[1]
        if rec is None or rec.released or rec.version != t._version:
            rec = _Record(self, nbytes, t._version, t if self.cuda else None)
            run.seen[key] = (StorageWeakRef(t.untyped_storage()), rec)
            run.records.append(rec)
            self.host += nbytes
            self.host_peak = max(self.host_peak, self.host)
            if self.cuda:
                self.unreaped.append((run.index, rec))
        return _Packed(rec, t)

    def reap(self, before: int | None = None) -> None:
        """Drop the sources of copies done: those of runs before ``before`` (None: all)."""
        keep = []
        for index, rec in self.unreaped:
            if before is None or index < before:
                rec.source = None
            else:
                keep.append((index, rec))
        self.unreaped = keep

    def backward_started(self, run: _Run) -> None:
        if run.started:
            return
        run.started = True
        run.fetch()
        prev, left = run.prev, self.depth
        while prev is not None and left > 0:
            if not prev.started:
                prev.fetch()
            prev, left = prev.prev, left - 1

    def begin(self, index: int) -> None:
        self.run = self.last = _Run(index, self.last)

    def end(self, output: Any) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        if self.cuda:
            self.reap(before=run.index)  # the poll after a block's forward
        tensors = [x for x in tree_flatten(output)[0] if isinstance(x, Tensor) and x.requires_grad]
        fired = [False]

        def hook(grad: Tensor) -> None:  # once per run, as PrefetchScheduler.watch_backward
            if not fired[0]:
                fired[0] = True
                self.backward_started(run)

        for x in tensors:
            x.register_hook(hook)


def _hook_pair(
    state: _State, step: TracedStep
) -> tuple[Callable[[Tensor], Any], Callable[[Any], Tensor]]:
    """The saved-tensor hooks: count every save as ``trace_step`` does; in a block, swap the
    storages of ``min_bytes`` and more (``_State.swap``); unpack fetches (polls first on
    CUDA, as swap's unpack does)."""

    def pack(t: Tensor) -> Any:
        if t.untyped_storage()._cdata in step.skip:
            return t  # a weight: kept, not counted (as swap's pack keeps it)
        nbytes = int(t.untyped_storage().nbytes())
        step.note_saved(t)
        if state.run is None or nbytes < max(state.min_bytes, 1):
            return t
        return state.swap(t, nbytes)

    def unpack(packed: Any) -> Tensor:
        if not isinstance(packed, _Packed):
            return packed
        if state.cuda:
            state.reap()  # swap's unpack polls first
        return packed.unpack()

    return pack, unpack


class _SwapStep(TracedStep):
    """``TracedStep`` whose block entries and exits drive the swap schedule."""

    state: _State

    def enter(self, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().enter(i, args, kwargs)
        self.state.begin(i)

    def leave(self, output: Any) -> None:
        super().leave(output)
        self.state.end(output)


def trace_swap(
    model: nn.Module,
    inputs: dict[str, Tensor],
    cuda: bool = False,
    accumulate: bool = False,
    min_swap_bytes: int = MIN_SWAP_BYTES,
    prefetch_depth: int = PREFETCH_DEPTH,
) -> SwapTrace:
    """Forward + backward of the meta ``model`` with every block swapped (see above).

    ``cuda``: copies finish in the background (sources kept until polled); else synchronous
    (a CPU device). ``accumulate`` as in ``trace_step``."""
    step = _SwapStep(model, accumulate)
    step.state = state = _State(step.live, cuda, min_swap_bytes, prefetch_depth)
    pack, unpack = _hook_pair(state, step)
    step.run(inputs, torch.autograd.graph.saved_tensors_hooks(pack, unpack), fused_attention())
    return SwapTrace(**step.fields(), pinned_peak=state.host_peak)
