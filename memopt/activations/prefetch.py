"""Prefetch ordering: when block i's backward starts, block i-1's swapped activations come back.

A *run* is one forward call of one managed block. ``PrefetchScheduler.begin(name)`` opens a
run linked to the run opened just before it (the block that ran earlier in the forward, whose
backward comes next). Whatever the run swaps out is registered with ``run.add(item)``; an item
is anything with ``prefetch()`` (a ``SwapRecord``: it starts its copy back to the device on the
side stream and returns at once).

``watch_backward(run, output)`` puts a gradient hook on the run's output tensors: it fires when
the gradient with respect to the block's output is ready, i.e. just before the block's own
backward. The hook prefetches the run itself (in case nothing prefetched it yet) and the
``depth`` runs before it, so their host-to-device copies overlap this block's backward.

Runs and items are held weakly (a run lives as long as its output's hook, an item as long as
autograd keeps its packed form), so the scheduler never keeps a freed activation alive.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["PrefetchScheduler", "Run"]


class Prefetchable(Protocol):
    def prefetch(self) -> None: ...


class Run:
    """One forward call of one managed block and what it swapped out."""

    __slots__ = ("name", "_items", "_prev", "backward_started", "__weakref__")

    def __init__(self, name: str, prev: Run | None) -> None:
        self.name = name
        self._items: weakref.WeakSet[Any] = weakref.WeakSet()
        self._prev = weakref.ref(prev) if prev is not None else None
        self.backward_started = False

    def add(self, item: Prefetchable) -> None:
        self._items.add(item)

    @property
    def prev(self) -> Run | None:
        return self._prev() if self._prev is not None else None

    def prefetch(self) -> None:
        for item in list(self._items):
            item.prefetch()


class PrefetchScheduler:
    """Links runs in forward order and prefetches ``depth`` runs back at each backward start."""

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self._last: Run | None = None
        self._lock = threading.Lock()
        self.prefetches = 0  # runs prefetched by a backward hook (for tests and reports)

    def begin(self, name: str) -> Run:
        with self._lock:
            run = Run(name, self._last)
            self._last = run
            return run

    def backward_started(self, run: Run) -> None:
        if run.backward_started:
            return
        run.backward_started = True
        run.prefetch()
        prev, left = run.prev, self.depth
        while prev is not None and left > 0:
            if not prev.backward_started:
                prev.prefetch()
                self.prefetches += 1
            prev, left = prev.prev, left - 1

    def watch_backward(self, run: Run, output: Any, extra: Any = None) -> None:
        """Call ``backward_started(run)`` (and ``extra()``) when ``output``'s grad is ready.

        ``output`` is any nest of tensors (a tuple, a dict, an HF ``ModelOutput``); tensors that
        do not require grad are ignored. The hook runs once per run.
        """
        tensors = [
            t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        if not tensors:
            return
        fired = [False]

        def hook(grad: torch.Tensor) -> None:
            if fired[0]:
                return
            fired[0] = True
            self.backward_started(run)
            if extra is not None:
                extra()

        for t in tensors:
            t.register_hook(hook)

    def reset(self) -> None:
        with self._lock:
            self._last = None
