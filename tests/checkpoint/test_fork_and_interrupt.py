"""A checkpointer across a fork and a Ctrl-C.

Fork: a process forked from the checkpointer's owner (a DataLoader worker under the default
``fork`` start method) neither waits for nor closes the parent's checkpointer when it exits,
and refuses to use it (a clear RuntimeError, not a hang). Ctrl-C: a ``KeyboardInterrupt`` at
the points where ``save()`` hands its work over leaves nothing half done (the next step,
``save()``, ``wait()`` and ``close()`` work). Every wait here is bounded.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from memopt.checkpoint import AsyncCheckpointer, Snapshot, exit_hook
from tests._harness.fork import in_child

_FORK = multiprocessing.get_context("fork")


@contextmanager
def _checkpointer(directory: Path) -> Iterator[AsyncCheckpointer]:
    """A checkpointer closed at the end; one a failed test left broken is only untracked (its
    close() or the exit hook could wait forever for a job no thread has)."""
    ck = AsyncCheckpointer(directory, keep=3, fsync=False)
    try:
        yield ck
    except BaseException:
        exit_hook.untrack(ck)
        raise
    ck.close()


@contextmanager
def _slow_writes(monkeypatch: pytest.MonkeyPatch, first: int = 0) -> Iterator[threading.Event]:
    """The writer holds each save of step ``first`` or later until the event is set: a save
    stays in flight. (Enter it before making the checkpointer: its pipeline binds _write.)"""
    gate = threading.Event()
    real = AsyncCheckpointer._write

    def held(self: AsyncCheckpointer, job: Any) -> None:
        if job.step >= first:
            gate.wait(30)
        real(self, job)

    monkeypatch.setattr(AsyncCheckpointer, "_write", held)
    try:
        yield gate
    finally:
        gate.set()


def _noop() -> None:
    pass


def _fork_noop(timeout_s: float) -> tuple[bool, int | None]:
    """Fork a child that does nothing and exits; (it hung, its exit code). A hung child is
    killed."""
    child = _FORK.Process(target=_noop)
    child.start()
    child.join(timeout_s)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    return alive, child.exitcode


@pytest.mark.timeout(60)
def test_forked_child_exit_leaves_the_parents_save_alone(tmp_path, monkeypatch) -> None:
    # the old exit hook ran in every fork child (multiprocessing children run threading's exit
    # callbacks) and waited, unbounded on one process, for a save only the parent can finish:
    # a DataLoader epoch took 5 s more per worker
    model = nn.Linear(16, 16)
    with _slow_writes(monkeypatch) as gate, _checkpointer(tmp_path) as ck:
        ck.save(1, model=model)
        t = time.monotonic()
        alive, exitcode = _fork_noop(8)
        assert not alive and exitcode == 0, "the forked child hung at its exit"
        assert time.monotonic() - t < 5
        assert not ck._closed and ck in exit_hook._live
        gate.set()
        ck.wait()
        assert ck.latest() == 1


@pytest.mark.timeout(60)
def test_forked_child_refuses_the_inherited_checkpointer(tmp_path, monkeypatch) -> None:
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with _slow_writes(monkeypatch, first=2) as gate, _checkpointer(tmp_path / "ck") as ck:
        ck.save(1, model=model, optimizer=opt)
        ck.wait()
        ck.save(2, model=model, optimizer=opt)  # in flight at the fork

        def child() -> str:
            said = []
            for call in (lambda: ck.save(3, model=model), ck.wait, ck.load, ck.close):
                try:
                    call()
                    said.append("no error")
                except RuntimeError as e:
                    said.append(str(e))
            model(torch.randn(2, 16)).sum().backward()
            opt.step()  # the fence does nothing here: the child's tensors are its own
            exit_hook._at_exit()  # what the child's exit runs: nothing to finish here
            (published,) = (tmp_path / "ck").glob("step_*")  # step 2 is still held
            snap = Snapshot(str(published))
            said.append(f"read step {snap.step}")
            return "\n".join(said)

        said = in_child(tmp_path, child, timeout_s=10).split("\n")
        gate.set()
        assert len(said) == 5, said
        for text, what in zip(said, ("save", "wait", "load", "close"), strict=False):
            assert text.startswith(f"AsyncCheckpointer.{what}: ") and "inherited by fork" in text
        assert "Save from the parent process" in said[0] and "Snapshot(" in said[0]
        assert said[4] == "read step 1"
        ck.wait()  # the parent's save went on
        assert ck.steps() == [1, 2]
        ck.save(4, model=model, optimizer=opt)
    assert ck.steps() == [1, 2, 4]


def _fork_during_training(rank: int, world: int, directory: str) -> tuple[Any, ...]:
    # the old exit hook close()d the inherited copy in each fork child: that destroyed the
    # gloo group it shares with the parent, and the child hung, then crashed
    model = nn.Linear(8, 8)
    with AsyncCheckpointer(directory, keep=2, fsync=False) as ck:
        ck.save(1, model=model)
        ck.wait()
        alive, exitcode = _fork_noop(10)
        ck.save(2, model=model)
        ck.wait()
        return alive, exitcode, ck.steps()


@pytest.mark.timeout(60)
def test_forked_child_keeps_the_parents_group_on_two_ranks(tmp_path) -> None:
    from tests._harness.dist import run_distributed

    out = run_distributed(_fork_during_training, world_size=2, timeout_s=50,
                          args=(str(tmp_path),))  # fmt: skip
    assert out == [(False, 0, [1, 2])] * 2, out


# --- Ctrl-C ------------------------------------------------------------------------------


def _ctrl_c_before(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` preceded by a real SIGINT, delivered to this (the main) thread right there."""

    def wrapper(*a: Any, **k: Any) -> Any:
        signal.raise_signal(signal.SIGINT)
        return fn(*a, **k)

    return wrapper


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_save_is_handed_over(tmp_path, monkeypatch) -> None:
    # between appending the job and submitting it, the old save() left a job no thread had:
    # the fence blocked the next optimizer.step() forever, and wait() and close() too
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 16)).sum().backward()
    with _checkpointer(tmp_path) as ck:
        monkeypatch.setattr(ck._pipeline, "submit", _ctrl_c_before(ck._pipeline.submit))
        with pytest.raises(KeyboardInterrupt):
            ck.save(1, model=model, optimizer=opt)
        monkeypatch.undo()
        assert len(ck._jobs) == 1
        assert ck._jobs[0].copied.wait(5), "the interrupted save was never handed over"
        opt.step()  # the fence lets it through
        ck.wait()
        assert ck.steps() == [1]  # the save went on: it was whole when the interrupt came
        ck.save(2, model=model, optimizer=opt)
    assert ck.steps() == [1, 2]


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_fence_is_registered(tmp_path) -> None:
    # the first save with each optimizer registers its fence; a Ctrl-C there used to keep the
    # save's staging slot: after max_inflight (2) of them, save() blocked forever
    model = nn.Linear(16, 16)
    opts = []
    with _checkpointer(tmp_path) as ck:
        assert ck.config.max_inflight == 2
        for i in range(2):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            opt.register_step_pre_hook = _ctrl_c_before(opt.register_step_pre_hook)
            opts.append(opt)
            with pytest.raises(KeyboardInterrupt):
                ck.save(i, model=model, optimizer=opt)
        saver = threading.Thread(target=ck.save, args=(10,), kwargs={"model": model}, daemon=True)
        saver.start()
        saver.join(5)
        assert not saver.is_alive(), "save() waits for staging slots the interrupts kept"
        ck.wait()
        assert ck.steps() == [10]  # the interrupted saves made nothing
        # each fence was registered whole, so close() can remove it
        assert all(len(o._optimizer_step_pre_hooks) == 1 for o in opts)
    assert all(not o._optimizer_step_pre_hooks for o in opts)
