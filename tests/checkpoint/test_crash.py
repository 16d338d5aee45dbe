"""Crash trials: kill -9 a training process that saves every step, at a random moment.

Afterwards every published snapshot passes its checksums and loads, ``latest()`` is one of
them, and leftovers of the interrupted save (a ``.tmp-step_...`` directory and its lock file)
are invisible to ``latest()`` and removed by the first save of the next checkpointer.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from memopt.checkpoint import AsyncCheckpointer, Snapshot
from tests.checkpoint import _common as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(root: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint._worker", "loop", root],
        cwd=ROOT,
        env=T.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_after(proc: subprocess.Popen[str], saves: int, delay: float) -> int:
    """SIGKILL ``proc`` ``delay`` seconds after it reported ``saves`` saves; returns the last
    step it reported."""
    assert proc.stdout is not None
    seen = 0
    while seen < saves:
        line = proc.stdout.readline()
        if not line:
            break
        seen = int(line)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    rest = proc.stdout.read()  # (through the same buffered reader: lines already read ahead)
    assert seen >= saves, proc.stderr.read() if proc.stderr else ""
    return max([seen, *(int(x) for x in rest.split())])  # the last save it reported


def _tmps(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith(".tmp"))


def _check(root: str, seen: int) -> None:
    model, opt, sched = T.make_all("adamw")
    crashed = _tmps(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum failure would warn and fall back
        with AsyncCheckpointer(root) as ckpt:
            steps = ckpt.steps()
            assert steps and ckpt.latest() == steps[-1]
            # max_inflight=1: save(n) returns once save(n-1) is published; n+1 may be too
            assert seen - 1 <= steps[-1] <= seen + 1
            for s in steps:
                Snapshot(os.path.join(root, f"step_{s:010d}"))  # checksums pass
            extra = ckpt.load(model=model, optimizer=opt, scheduler=sched)
            assert extra["next_step"] == steps[-1]
            assert _tmps(root) == crashed  # a reader removes nothing (it may be a live save's)
            ckpt.save(steps[-1] + 1, model=model, optimizer=opt, scheduler=sched)
    assert _tmps(root) == []  # the first save of the run that goes on removed them


@pytest.mark.timeout(200)
def test_kill_9_during_saves_leaves_only_complete_snapshots(tmp_path) -> None:
    """Two trials at once (each a fresh interpreter), killed at random points."""
    rng = random.Random(7)
    roots = [str(tmp_path / f"trial{i}") for i in range(2)]
    procs = [_start(r) for r in roots]
    plan = [(rng.randint(2, 6), rng.uniform(0.0, 0.03)) for _ in procs]
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            seen = list(pool.map(lambda a: _kill_after(a[0], *a[1]), zip(procs, plan, strict=True)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for root, n in zip(roots, seen, strict=True):
        _check(root, n)
