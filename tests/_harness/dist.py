"""Run a function on N ranks of a real torch.distributed process group, from a test.

``run_distributed(fn, world_size=2)`` spawns ``world_size`` processes (start method "spawn"),
each of which joins a process group rendezvoused through a ``FileStore`` in a fresh temp dir,
runs ``fn(rank, world_size, *args)``, destroys the group, and sends its return value back over
a pipe. The parent returns the per-rank values as a list indexed by rank.

Failure handling -- a failure is always raised, never skipped:

- a rank raising: the parent raises ``RankError`` naming the rank, the exception and its remote
  traceback (chained from the original exception when that one unpickles);
- a rank dying without reporting (segfault, ``os._exit``): ``RankError`` with its exit code;
- anything still running after ``timeout_s``: every child is killed and ``TimeoutError`` names
  the ranks still alive, with their Python stacks (dumped by faulthandler on SIGUSR1).

This copies the pattern of torch's ``MultiProcessTestCase`` without importing
``torch.testing._internal``. ``fn`` must be picklable by reference: a module-level function.
Children run with ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``: CI has 2 cores.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankError", "run_distributed"]

# After the first rank fails, give the others this long to report (their own failure is often
# the informative one) before they are killed.
_GRACE_AFTER_ERROR_S = 3.0


class RankError(RuntimeError):
    """A rank raised (or died); the message carries the rank's traceback text."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


def _stack_path(tmpdir: str, rank: int) -> str:
    return os.path.join(tmpdir, f"stack.{rank}.txt")


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    store_path: str,
    tmpdir: str,
    timeout_s: float,
    args: tuple[Any, ...],
    conn: Connection,
) -> None:
    """Child entry point: join the group, run ``fn``, always destroy the group, report."""
    stack_file = open(_stack_path(tmpdir, rank), "w")  # stays open for the child's lifetime
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    torch.set_num_threads(1)
    payload: tuple[str, Any]
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            payload = ("ok", fn(rank, world_size, *args))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException as exc:  # report everything, KeyboardInterrupt and SystemExit included
        payload = (
            "err",
            (_picklable_or_none(exc), f"{type(exc).__name__}: {exc}", traceback.format_exc()),
        )
    try:
        data = pickle.dumps(payload)
    except Exception as exc:  # the return value could not be pickled
        data = pickle.dumps(
            (
                "err",
                (
                    None,
                    f"rank {rank} returned an unpicklable value: {exc!r}",
                    traceback.format_exc(),
                ),
            )
        )
    conn.send_bytes(data)
    conn.close()


def _picklable_or_none(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    backend: str = "gloo",
    timeout_s: float = 60,
    args: Sequence[Any] = (),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return per-rank values.

    Raises ``RankError`` if any rank raises or dies, ``TimeoutError`` if any rank is still
    running after ``timeout_s`` seconds (all children are killed first).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size=}")
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"fn must be picklable by reference (a module-level function), got {fn!r}"
        ) from exc

    tmpdir = tempfile.mkdtemp(prefix="memopt_dist_")
    procs: list[Any] = []
    conns: dict[int, Connection] = {}
    try:
        _spawn(fn, world_size, backend, tmpdir, timeout_s, tuple(args), procs, conns)
        return _collect(procs, conns, tmpdir, timeout_s)
    finally:
        _kill_all(procs)
        for c in conns.values():
            c.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _spawn(
    fn: Callable[..., Any],
    world_size: int,
    backend: str,
    tmpdir: str,
    timeout_s: float,
    args: tuple[Any, ...],
    procs: list[Any],
    conns: dict[int, Connection],
) -> None:
    """Start the ranks, appending to ``procs``/``conns`` as they go (so cleanup sees them all)."""
    ctx = mp.get_context("spawn")
    store_path = os.path.join(tmpdir, "store")
    old_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children at spawn time
    try:
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            conns[rank] = recv
            # Not daemonic: a daemonic child may not start its own children (DataLoader workers).
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, backend, store_path, tmpdir, timeout_s, args, send),
                name=f"rank{rank}",
            )
            p.start()
            procs.append(p)
            send.close()  # the parent keeps only the read end, so a dead child reads as EOF
    finally:
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp


def _collect(
    procs: list[Any], conns: dict[int, Connection], tmpdir: str, timeout_s: float
) -> list[Any]:
    """Wait for every rank's report (or death), honouring the deadline; raise on any failure."""
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    errors: dict[int, tuple[BaseException | None, str, str]] = {}
    pending = dict(conns)
    while pending:
        now = time.monotonic()
        if errors:
            deadline = min(deadline, now + _GRACE_AFTER_ERROR_S)
        if now >= deadline:
            break
        for conn in wait(list(pending.values()), timeout=deadline - now):
            assert isinstance(conn, Connection)
            rank = next(r for r, c in pending.items() if c is conn)
            del pending[rank]
            try:
                status, value = pickle.loads(conn.recv_bytes())
            except EOFError:  # the child died before reporting
                procs[rank].join(timeout=5)
                code = procs[rank].exitcode
                errors[rank] = (
                    None,
                    f"rank {rank} exited (exit code {code}) without reporting",
                    "",
                )
                continue
            if status == "ok":
                results[rank] = value
            else:
                errors[rank] = value
    if errors:
        _raise_rank_error(errors, sorted(pending))
    if pending:
        _raise_timeout(procs, sorted(pending), tmpdir, timeout_s)
    # Every rank reported; each must also exit (a hang in teardown is a hang too).
    for rank, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            _raise_timeout(procs, [rank], tmpdir, timeout_s, after_report=True)
    return [results[r] for r in range(len(procs))]


def _raise_rank_error(
    errors: dict[int, tuple[BaseException | None, str, str]], still_running: list[int]
) -> None:
    first = next(iter(errors))  # the first rank to report a failure is usually the cause
    exc, summary, tb = errors[first]
    lines = [f"rank {first} failed: {summary}"]
    if tb:
        lines += [f"--- rank {first} traceback ---", tb.rstrip()]
    for rank, (_, other, _) in errors.items():
        if rank != first:
            lines.append(f"(rank {rank} also failed: {other})")
    if still_running:
        lines.append(f"(ranks {still_running} were still running and were killed)")
    raise RankError(first, "\n".join(lines), tb) from exc


def _raise_timeout(
    procs: list[Any], alive: list[int], tmpdir: str, timeout_s: float, after_report: bool = False
) -> None:
    for rank in alive:  # ask faulthandler in each hung child for its stacks, then read them
        if hasattr(signal, "SIGUSR1") and procs[rank].is_alive() and procs[rank].pid:
            os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(0.5)
    _kill_all(procs)
    what = "reported but did not exit" if after_report else "still running"
    lines = [f"run_distributed: ranks {alive} {what} after timeout_s={timeout_s}; killed all ranks"]
    for rank in alive:
        try:
            with open(_stack_path(tmpdir, rank)) as f:
                stack = f.read().strip()
        except OSError:
            stack = ""
        if stack:
            lines += [f"--- rank {rank} stacks ---", stack]
    raise TimeoutError("\n".join(lines))


def _kill_all(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)
