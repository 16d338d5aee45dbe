"""IOFuture: exceptions from background pieces reach wait(); callbacks; timeouts."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import threading

import pytest
import torch

from memopt.offload.tier import IOFuture, request_nbytes, wait_all


def test_background_exception_reraised_after_all_pieces() -> None:
    gate = threading.Event()
    with cf.ThreadPoolExecutor(2) as pool:

        def boom() -> None:
            raise OSError(errno.EIO, "disk on fire")

        slow = pool.submit(gate.wait, 5)
        fut = IOFuture([pool.submit(boom), slow], "test")
        seen: list[BaseException | None] = []
        fut.add_done_callback(seen.append)
        with pytest.raises(TimeoutError, match="test"):
            fut.wait(timeout=0.05)  # the failed piece alone does not finish the future
        gate.set()
        with pytest.raises(OSError, match="disk on fire") as info:
            fut.wait()
    assert info.value.errno == errno.EIO and isinstance(seen[0], OSError) and fut.done()


def test_callback_error_is_kept_and_wait_all_raises_first() -> None:
    ok = IOFuture.completed()
    bad = IOFuture.completed(ValueError("first"))
    with pytest.raises(ValueError, match="first"):
        wait_all([ok, bad, IOFuture.completed(KeyError("second"))])
    with cf.ThreadPoolExecutor(1) as pool:
        gate = threading.Event()
        fut = IOFuture([pool.submit(gate.wait, 5)])

        def fail(_err: BaseException | None) -> None:
            raise RuntimeError("commit failed")

        fut.add_done_callback(fail)
        gate.set()
        with pytest.raises(RuntimeError, match="commit failed"):
            fut.wait()


def test_request_nbytes() -> None:
    assert request_nbytes(100, None) == (100, None)
    assert request_nbytes((3, 4), torch.bfloat16) == (24, (3, 4))
    assert request_nbytes(5, torch.float64) == (40, (5,))
    with pytest.raises(ValueError, match=">= 0"):
        request_nbytes(-1, None)


def test_io_future_whose_pieces_finished_first_lets_go_of_its_buffers() -> None:
    """The NVMe tier attached the buffers after building the future; a piece that had
    already finished (fast I/O) released nothing, and the buffer stayed held by the future."""
    piece: cf.Future = cf.Future()
    piece.set_result(None)
    buf = torch.zeros(4)
    fut = IOFuture([piece], "test I/O", keep_alive=buf)
    fut.wait()
    assert fut.keep_alive is None
