"""What an ``AsyncCheckpointer`` owns, and how it is released: by ``close()``, or by the
garbage collector when the program drops the checkpointer without closing it.

A checkpointer owns its copier and writer threads (``pipeline``), the writer's I/O engines
(a native AIO thread and its eventfd, or a few ``pwrite`` threads), a staging arena (one
snapshot's bytes per save in flight, kept for the next save), the redundancy tier when there
is one (its thread, its mirror, a gloo group) and, on 2+ ranks, a gloo group of its own
(fds and threads). None of these refer back to the checkpointer:

- the pipeline's threads reach it only through the job they work on: ``save`` sets
  ``Job.owner`` when it hands the job over, and the writer clears it once the job is done
  (``by_owner`` gives the pipeline the write/publish *functions*, never bound methods);
- the fence pre-hook on the optimizer holds it by a weak reference (``weak_fence``).

So a checkpointer nobody references stays alive exactly while it has saves in flight, which
are finished and published as if ``wait()`` had been called (the exit hook does the same at
interpreter exit), and is then collected; its finalizer (``collected``) does what
``close()`` does after its wait. Before, the threads' bound methods kept every dropped
checkpointer, and all it owned, for the life of the process: a sweep of trials on 2 ranks
ran out of file descriptors after ~140 of them. A failure of such a save that nothing raised
any more is reported by a warning from the finalizer.

Where the finalizer runs: in the thread that dropped the last reference; for a checkpointer
dropped with saves in flight that is its own writer thread, which does not join itself, and
which leaves the optimizers' pre-hooks in place (dead, they do nothing) rather than remove
them while the training thread may be iterating them in ``optimizer.step()``. In a forked
child the finalizer does nothing: the threads and the group are the parent's (``forked``).
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from memopt._utils import get_logger
from memopt.checkpoint.groups import release as release_group
from memopt.checkpoint.pipeline import Job, Pipeline
from memopt.checkpoint.writer import Engines
from memopt.offload.arena import PinnedArena

log = get_logger("memopt.checkpoint")


def by_owner(method: Callable[[Job], None]) -> Callable[[Job], None]:
    """``method`` (a checkpointer's bound method, looked up now, as the pipeline always did)
    called on the job's owner: what the pipeline holds keeps no checkpointer alive."""
    fn = method.__func__  # type: ignore[attr-defined]

    def call(job: Job) -> None:
        fn(job.owner, job)

    return call


def weak_fence(ckpt: Any) -> Callable[..., None]:
    """The optimizer's step pre-hook: ``ckpt.fence()`` while ``ckpt`` lives, then nothing
    (a live save keeps its checkpointer alive, so no copy in flight is ever skipped)."""
    ref = weakref.ref(ckpt)

    def fence(*_: Any) -> None:
        ckpt = ref()
        if ckpt is not None:
            ckpt.fence()

    return fence


@dataclass(eq=False)
class Owned:
    """The checkpointer's resources (the same objects as its attributes), released once."""

    pid: int
    directory: str
    pipeline: Pipeline
    engines: Engines
    arena: PinnedArena
    peers: Any
    group: Any
    hooks: weakref.WeakKeyDictionary[Any, Any]
    # failed saves nobody raised yet, by save number (a summary: a job's traceback may hold
    # frames of its checkpointer, so no job is kept here)
    unreported: dict[int, str]

    def release(self, remove_hooks: bool = True) -> None:
        """Stop the threads, close the engines, remove the fence hooks, give the staging
        memory back, close the redundancy tier, destroy the gloo group (not collective).
        Only once nothing is in flight (``close()`` waits first)."""
        try:
            self.pipeline.close()
            self.engines.close()  # (the writer thread has ended: no write is in flight)
        finally:
            if remove_hooks:
                for h in list(self.hooks.values()):
                    h.remove()
                self.hooks.clear()
            self.arena.close()
            if self.peers is not None:
                self.peers.close()
            release_group(self.group)  # its own gloo group: 5 fds and 3 threads
            self.group = None


def start(ckpt: Any, **options: Any) -> tuple[Owned, weakref.finalize[Any, Any]]:
    """``ckpt``'s pipeline (``options``: ``Pipeline``'s), what it owns and the finalizer
    that releases it all if ``ckpt`` is garbage-collected without ``close()``."""
    unreported: dict[int, str] = {}
    pipeline = Pipeline(ckpt.arena, by_owner(ckpt._write), by_owner(ckpt._publish),
                        ckpt._slots.release, finished=partial(_note, unreported), **options)
    owned = Owned(os.getpid(), ckpt.directory, pipeline, ckpt._engines, ckpt.arena, ckpt.peers,
                  ckpt._group, ckpt._hooks, unreported)  # fmt: skip
    finalizer = weakref.finalize(ckpt, collected, owned)
    finalizer.atexit = False  # (at exit the exit hook finishes and closes what is alive)
    return owned, finalizer


def _note(unreported: dict[int, str], job: Job) -> None:
    """The writer, once ``job``'s outcome is final (before ``job.done`` is set)."""
    if job.error is not None and not job.reported:
        unreported[job.seq] = f"step {job.step}: {job.error}"


def collected(owned: Owned) -> None:
    """The finalizer of a checkpointer garbage-collected without ``close()`` (see above)."""
    if os.getpid() != owned.pid:  # a forked child's copy: nothing here is its own
        return
    own_thread = threading.current_thread() in owned.pipeline.threads
    try:
        owned.release(remove_hooks=not own_thread)
    except Exception as e:  # noqa: BLE001 - a finalizer has nobody to raise to
        warnings.warn(f"AsyncCheckpointer for {owned.directory}, garbage-collected without "
                      f"close(): releasing its threads and memory failed: {e!r}",
                      stacklevel=2)  # fmt: skip
    if owned.unreported:
        steps = "; ".join(owned.unreported.values())
        warnings.warn(f"AsyncCheckpointer for {owned.directory} was garbage-collected without "
                      f"close() after a failed save nobody waited for ({steps}); call wait() "
                      "or close() to get such errors raised", stacklevel=2)  # fmt: skip
    log.info("checkpoint: a checkpointer of %s was garbage-collected: released", owned.directory)
