"""Keep the ranks' module buffers equal, as DDP's ``broadcast_buffers`` does, for ``memopt.shard``.

Module buffers (BatchNorm's running statistics, counters, any tensor a forward updates in
place) are not parameters: no gradient averages them, so under stages 1/2/3 each rank's copy
follows its own data and the ranks drift apart; a checkpoint, which keeps rank 0's copy of
every unsharded tensor, then hands rank 0's buffers to every rank on resume. DDP, which
``memopt.shard`` replaces, broadcasts rank 0's buffers at the start of the forward that
follows a synchronizing training forward. ``BufferSync`` broadcasts them at the end of every
``step()`` of the sharded optimizer instead (and once when ``memopt.shard`` installs it):

- in a training loop (forward/backward, possibly several micro-batches under ``no_sync()``,
  then ``step()``) that is the same moment for the next training forward: it starts from rank
  0's buffers as of the end of the last step's forwards, as under DDP, so the training
  numbers are DDP's; an evaluation after ``step()`` sees rank 0's statistics on every rank,
  and a checkpoint saved after ``step()`` holds buffers equal on every rank, so a resume is
  exact on every rank;
- a forward never issues a collective: a forward on some ranks only (rank 0 alone generating
  samples or evaluating between steps) works as it did before, where DDP's rule would make
  it wait for the other ranks (a DDP user calls ``ddp.module`` for that; here the model is
  the module);
- the one difference from DDP: a training-mode forward without a following ``step()`` (under
  ``no_grad``, say) changes this rank's buffers, and the next training forward starts from
  them, where DDP would broadcast first.

Every buffer counts, persistent or not (``model.buffers()``, as DDP): a non-persistent one
that is equal everywhere (a rotary ``inv_freq``) costs its few bytes in the same bucket.
DTensor, meta and empty buffers are left out.

Communication: rank 0 of the sharding group is the source; buffers are packed per (device,
dtype) into flat buckets of at most ``bucket_bytes`` (a lone contiguous buffer is sent in
place) and broadcast asynchronously through ``Comm`` (fingerprinted in debug mode), then the
receivers unpack. The copies keep the buffers' autograd version counters (as DDP does), so a
graph still holding a buffer saved for backward does not fail its backward. Nothing is
installed on one rank, with ``broadcast_buffers=False``, or for a model without buffers.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from memopt.sharding.comm import Comm

__all__ = ["BufferSync", "install_buffer_sync"]


class BufferSync:
    """Broadcasts ``model``'s buffers from rank 0 when called (see the module)."""

    def __init__(self, model: nn.Module, comm: Comm, bucket_bytes: int) -> None:
        self.comm, self.bucket_bytes = comm, bucket_bytes
        self._model = weakref.ref(model)  # (the optimizer holds this: never keeps the model)

    def __call__(self) -> None:
        model = self._model()
        if model is not None:
            self.broadcast(model)

    def broadcast(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers now (a collective: every rank must call it)."""
        named = _buffers(model)
        if not named:
            return
        bufs = tuple(b for _, b in named)
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(bufs):
            sent = [self._send(chunk) for chunk in _chunks(named, self.bucket_bytes)]
            for work, flat, chunk in sent:
                work.wait()
                if self.comm.rank != 0 and flat is not None:
                    _unpack(flat, [b for _, b in chunk])

    def _send(self, chunk: list[tuple[str, Tensor]]) -> tuple[Any, Tensor | None, Any]:
        """Launch one bucket's broadcast; ``flat`` is None when the buffer was sent in place."""
        tensors = [b for _, b in chunk]
        wire = self._wire_device(tensors[0].device)
        t0 = tensors[0]
        if len(tensors) == 1 and t0.is_contiguous() and t0.device == wire:
            flat, send = None, t0
        elif self.comm.rank == 0:
            flat = send = torch.cat([b.reshape(-1) for b in tensors]).to(wire)
        else:
            numel = sum(b.numel() for b in tensors)
            flat = send = torch.empty(numel, dtype=t0.dtype, device=wire)
        names = [n for n, _ in chunk]

        def what() -> str:
            more = ", ..." if len(names) > 4 else ""
            return f"buffer broadcast {t0.dtype} [{', '.join(names[:4])}{more}]"

        return self.comm.broadcast(send, 0, what=what), flat, chunk

    def _wire_device(self, device: torch.device) -> torch.device:
        # NCCL moves device memory only: a CPU buffer travels through the group's device.
        if device.type == "cpu" and self.comm.backend() == "nccl":
            return self.comm.device()
        return device

def install_buffer_sync(model: nn.Module, optimizer: Any) -> BufferSync | None:
    """Make the sharded ``optimizer`` (which carries the ``ShardConfig`` and ``Comm``)
    broadcast ``model``'s buffers at the end of each ``step()``, and broadcast them once now
    (a collective, like ``memopt.shard`` itself): nothing on one rank, with
    ``broadcast_buffers=False`` or without buffers."""
    comm: Comm = optimizer.comm
    if not optimizer.config.broadcast_buffers or comm.world == 1 or comm.group is None:
        return None
    if not _buffers(model):  # (DDP likewise never syncs a model that had none at wrap time)
        return None
    sync = BufferSync(model, comm, optimizer.config.bucket_bytes)
    sync()  # the ranks start equal (DDP broadcasts at construction too)
    optimizer.buffer_sync = sync
    return sync


def _buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    from torch.distributed.tensor import DTensor

    return [
        (n, b)
        for n, b in model.named_buffers()
        if b.numel() and not b.is_meta and not isinstance(b, DTensor)
    ]


def _chunks(named: list[tuple[str, Tensor]], bucket_bytes: int) -> list[list[tuple[str, Tensor]]]:
    """Buckets of one (device, dtype) each, at most ``bucket_bytes`` (a larger buffer alone),
    in ``named_buffers`` order: the same on every rank."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[list[tuple[str, Tensor]]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for n, b in named:
        kind = (b.device, b.dtype)
        nbytes = b.numel() * b.element_size()
        buckets = by_kind.setdefault(kind, [[]])
        if buckets[-1] and sizes[kind] + nbytes > bucket_bytes:
            buckets.append([])
            sizes[kind] = 0
        buckets[-1].append((n, b))
        sizes[kind] = sizes.get(kind, 0) + nbytes
    return [bucket for buckets in by_kind.values() for bucket in buckets]


def _unpack(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for b in tensors:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view(b.shape))
        offset += n
