"""A training loop in a thread keeps saving after the main thread returned; nothing is lost.

The script's main thread starts a (non-daemon) training thread and returns. Python then runs
``threading``'s exit callbacks, where the exit hook used to close the checkpointer while the
thread was still using it: its next ``save`` raised "save after close()" and the later saves
were lost. ``concurrent.futures`` also refuses work from then on, so the writer's
thread-pool engine (``MEMOPT_AIO=threads``) failed every write after it. Now the hook waits
for that thread (it runs from ``atexit``, after Python joined it) and the last save, which
the thread never waited for, is published by the hook; the writer's threads are memopt's own.
On 2 ranks with in-memory redundancy, the same: the publication (collective) and the peers'
mirror copy (it ran on a ``concurrent.futures`` pool) work from the hook too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch import nn

from memopt.checkpoint import AsyncCheckpointer
from tests.checkpoint._common import env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, threading, time
import torch
import torch.distributed as dist
from torch import nn
from memopt.checkpoint import AsyncCheckpointer, RedundancyConfig

directory, final, store, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
red = None
if store != "-":  # 2 ranks
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    red = RedundancyConfig(mode="replicate", copies=1)
torch.manual_seed(0)
model = nn.Linear(64, 64)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ckpt = AsyncCheckpointer(directory, keep=2, fsync=False, redundancy=red)

def train():
    time.sleep(0.3)  # the main thread has returned by now
    for step in range(1, 6):
        model(torch.randn(4, 64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        ckpt.save(step, model=model, optimizer=opt)
    if rank == 0:
        torch.save(model.state_dict(), final)  # no wait(), no close(): the exit hook's job

threading.Thread(target=train, name="trainer").start()
"""


def _run(tmp_path: Path, engine: str, world: int) -> None:
    directory, final, store = tmp_path / "ckpt", tmp_path / "final.pt", tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(directory), str(final),
             str(store) if world > 1 else "-", str(rank)],
            cwd=ROOT, env={**env(), "MEMOPT_AIO": engine, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in range(world)
    ]
    try:
        said = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, said, strict=True):
        assert p.returncode == 0, text
        assert "Traceback" not in text and "Exception" not in text, text
    want = torch.load(final, weights_only=True)
    model = nn.Linear(64, 64)
    with AsyncCheckpointer(directory) as ckpt:
        assert ckpt.steps() == [4, 5]
        ckpt.load(model=model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert not [p for p in os.listdir(directory) if p.startswith(".")], os.listdir(directory)


def test_saves_from_a_thread_after_main_returned_are_published(tmp_path) -> None:
    _run(tmp_path, "threads", 1)  # the thread engine: it used concurrent.futures


def test_two_ranks_with_redundancy_finish_from_the_exit_hook(tmp_path) -> None:
    _run(tmp_path, "auto", 2)


class _NoNewThreads(threading.Thread):
    """A thread that cannot start, as on Python 3.12 once the main thread has returned."""

    def start(self) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")


def test_no_new_threads_at_exit_still_finishes_a_save(tmp_path, monkeypatch) -> None:
    """Python 3.12 refuses new threads once the main thread has returned: a rotated snapshot
    is then deleted in line, the writer falls back to the engine started with the
    checkpointer, and a checksum in pieces is taken in one pass (3.11 here: simulated)."""
    from memopt._utils import workers
    from memopt.checkpoint import checksum, publish

    with AsyncCheckpointer(tmp_path / "ck", keep=1, fsync=False) as ckpt:  # threads started
        monkeypatch.setattr(workers.threading, "Thread", _NoNewThreads)
        monkeypatch.setattr(publish.threading, "Thread", _NoNewThreads)
        monkeypatch.setenv("MEMOPT_AIO", "threads")  # a new engine would need new threads
        model = nn.Linear(64, 64)
        for step in (1, 2):
            ckpt.save(step, model=model)
            ckpt.wait()
        assert ckpt.steps() == [2]
        assert not [p for p in os.listdir(tmp_path / "ck") if p.startswith(".trash")]
        data = os.urandom(1 << 16)
        assert checksum.parallel_checksum("crc32", memoryview(data), 4096, 0, 2) == \
            checksum.checksum_fn("crc32")(data, 0)  # fmt: skip
