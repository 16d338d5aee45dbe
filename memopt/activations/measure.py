"""Measure one step under an applied plan and set it against the plan's prediction.

The managers installed by ``apply`` count what their blocks save in the manager's
``SavedLedger``. The planner's peak also includes what is saved *outside* the blocks
(embedding, final norm, head, loss). ``measure_step`` runs one forward+backward with an outer
``saved_tensors_hooks`` pair that counts those saves in the same ledger under the block name
``"<non-block>"``: inside a managed block the block's own hooks are innermost and win, and a
storage a block already holds (a checkpoint saves its block's inputs outside the block's
hooks) is not counted again. It returns the ledger's device peak over the step, the step time,
and on CUDA the allocator's peak over the step's starting allocation
(``torch.cuda.max_memory_allocated`` delta), which covers everything the step allocated, not
only saved activations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memopt.activations._probe import NONBLOCK, LossFn
from memopt.activations.hooks import Kept
from memopt.activations.ledger import SavedLedger, storage_key
from memopt.activations.profile import default_loss

__all__ = ["StepMeasure", "count_outside_blocks", "measure_step"]


@dataclass(frozen=True)
class StepMeasure:
    peak_bytes: int
    step_s: float
    cuda_peak_delta: int | None


def _held_by_a_block(ledger: SavedLedger, t: torch.Tensor) -> bool:
    # SavedLedger has no public lookup; its entries are keyed (place, block, storage).
    key = storage_key(t)
    with ledger._lock:
        return any(k[2] == key and k[1] != NONBLOCK for k in ledger._entries)


@contextmanager
def count_outside_blocks(ledger: SavedLedger, model: nn.Module) -> Iterator[None]:
    """Count saves made outside managed blocks in ``ledger`` (parameters and buffers skipped)."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    where = "outside the managed blocks"

    def pack(t: torch.Tensor) -> Kept:
        if type(t) is not torch.Tensor or t.untyped_storage().data_ptr() in skip:
            return Kept(t, None, where)
        if _held_by_a_block(ledger, t):  # e.g. a checkpoint saving its block's held input
            return Kept(t, None, where)
        return Kept(t, ledger.hold(t, place="device", block=NONBLOCK), where)

    def unpack(packed: Kept) -> torch.Tensor:
        return packed.get()

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def measure_step(model: nn.Module, batch: Any, ledger: SavedLedger,
                 loss_fn: LossFn | None = None) -> StepMeasure:
    """One forward+backward; the ledger's device peak over it (non-block saves included)."""
    loss_fn = loss_fn or default_loss
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        start_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ledger.reset_peak()
    t0 = time.perf_counter()
    with count_outside_blocks(ledger, model):
        loss = loss_fn(model, batch)
    loss.backward()
    del loss
    if cuda:
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - t0
    delta = torch.cuda.max_memory_allocated(device) - start_alloc if cuda else None
    return StepMeasure(ledger.peak("device"), step_s, delta)
