"""``IOFuture.wait`` raises a fresh exception each time, chained from the stored one.

It used to raise the stored exception object itself. Raising an object attaches the caller's
traceback to it, so the future (kept by whoever holds it: a swapped activation's record, held
by autograd's C++ nodes) then kept every frame of the call that waited, and all they referenced:
the backward, the loss and the graph. Each failed backward over swapped activations leaked that
way (tests/activations/test_swap_tier_errors.py has the end-to-end case).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import gc
import weakref

import pytest

from memopt.offload.tier import IOFuture, wait_all


class _Graph:
    """Stands for what a caller's frame references (a loss, an autograd graph)."""


def _call_wait(fut: IOFuture) -> weakref.ref[_Graph]:
    graph = _Graph()
    ref = weakref.ref(graph)
    try:
        fut.wait()
    except OSError:
        pass
    return ref


def test_a_failed_wait_does_not_keep_the_callers_frames() -> None:
    with cf.ThreadPoolExecutor(1) as pool:

        def boom() -> None:
            raise OSError(errno.EIO, "bad sector")

        fut = IOFuture([pool.submit(boom)], "test read")
        ref = _call_wait(fut)
        gc.collect()
        assert ref() is None  # before: alive as long as the future (held here, as a record
        assert fut.done()  # holds its futures)


def test_each_wait_raises_a_new_copy_chained_from_the_stored_error() -> None:
    stored = OSError(errno.ENOSPC, "tier full", "/nvme/memopt-rank0.swap")
    fut = IOFuture.completed(stored)
    seen = []
    for _ in range(2):
        with pytest.raises(OSError, match="tier full") as info:
            fut.wait()
        seen.append(info.value)
    first, second = seen
    assert first is not second and stored not in seen
    for err in seen:
        assert type(err) is OSError and err.errno == errno.ENOSPC
        assert err.filename == "/nvme/memopt-rank0.swap" and err.__cause__ is stored
    assert stored.__traceback__ is None  # the stored object was never raised
    with pytest.raises(FileNotFoundError) as info:
        IOFuture.completed(FileNotFoundError(errno.ENOENT, "gone")).wait()
    assert info.value.errno == errno.ENOENT
    with pytest.raises(KeyError, match="second"):
        wait_all([IOFuture.completed(), IOFuture.completed(KeyError("second"))])


def test_an_exception_that_cannot_be_rebuilt_becomes_a_runtime_error() -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"odd {a} {b}")

    stored = Odd(1, 2)
    with pytest.raises(RuntimeError, match=r"test write failed: Odd: odd 1 2") as info:
        IOFuture.completed(stored, "test write").wait()
    assert info.value.__cause__ is stored and stored.__traceback__ is None
