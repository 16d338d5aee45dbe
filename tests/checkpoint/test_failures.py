"""One process: how failed saves are reported, and saves still in flight at exit.

- ``save(k)`` that finds an earlier failure raises it and says that step k was NOT saved;
- ``metadata=`` is checked in the constructor (it goes into every manifest, as JSON);
- any failure of the commit (not only an ``OSError``) fails the save and removes its tmp dir;
- a failure outside the file write names the step and the rank;
- a script that ends without ``wait()``/``close()`` still publishes its last save (the exit
  hook), checked from a fresh process; the hook's wait is bounded when given a limit.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from memopt.checkpoint import AsyncCheckpointer, CheckpointError, exit_hook, fileformat
from memopt.checkpoint.pipeline import Pipeline
from tests.checkpoint import _common as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _finish_jobs(ckpt: AsyncCheckpointer) -> None:
    """Wait until the background saves are done, without raising their failures."""
    for job in list(ckpt._jobs):
        assert job.done.wait(30)


def test_save_after_a_failed_save_says_its_own_step_was_not_saved(tmp_path, monkeypatch) -> None:
    ckpt = AsyncCheckpointer(tmp_path, fsync=False)
    ckpt.save(1, extra={"s": 1})
    ckpt.wait()

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(fileformat.os, "write", full)
    monkeypatch.setattr(fileformat.os, "pwrite", full)
    ckpt.save(2, extra={"s": 2})
    _finish_jobs(ckpt)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"^checkpoint step 3 was NOT saved, because an "
                       r"earlier save failed: checkpoint step 2: .*No space left"):  # fmt: skip
        ckpt.save(3, extra={"s": 3})
    ckpt.wait()  # raised once, not again
    assert ckpt.steps() == [1]
    ckpt.save(4, extra={"s": 4})  # the checkpointer goes on
    ckpt.close()
    assert ckpt.steps() == [1, 4]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_metadata_must_be_json(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"metadata\['lr'\] = .*float32.*manifest.json"):
        AsyncCheckpointer(tmp_path, metadata={"lr": np.float32(1e-3)})
    with pytest.raises(ValueError, match=r"metadata\['cfg'\]"):
        AsyncCheckpointer(tmp_path, metadata={"name": "x", "cfg": {"dtype": torch.float32}})
    meta = {"lr": np.float64(1e-3), "cfg": {"layers": [1, None], "tied": True}}
    with AsyncCheckpointer(tmp_path, fsync=False, metadata=meta) as ckpt:
        ckpt.save(1, extra={"s": 1})
    assert ckpt.steps() == [1]


def test_any_commit_failure_fails_the_save_and_removes_its_tmp(tmp_path) -> None:
    ckpt = AsyncCheckpointer(tmp_path, fsync=False)
    ckpt.metadata = {"bad": object()}  # past the constructor's check
    ckpt.save(1, extra={"s": 1})
    with pytest.raises(CheckpointError, match=r"checkpoint step 1: publishing .* failed on "
                       r"rank 0: TypeError"):  # fmt: skip
        ckpt.wait()
    assert os.listdir(tmp_path) == []
    ckpt.metadata = {}
    ckpt.save(2, extra={"s": 2})
    ckpt.close()
    assert ckpt.steps() == [2]


def test_a_failure_outside_the_write_names_the_step_and_rank(tmp_path, monkeypatch) -> None:
    def lost(self: Pipeline, job: Any) -> None:
        raise RuntimeError("device lost (injected)")

    monkeypatch.setattr(Pipeline, "_copy", lost)
    with AsyncCheckpointer(tmp_path, fsync=False) as ckpt:
        ckpt.save(5, model=torch.nn.Linear(4, 4))
        with pytest.raises(CheckpointError, match=r"checkpoint step 5 failed on rank 0: "
                           r"RuntimeError\('device lost"):  # fmt: skip
            ckpt.wait()


_SCRIPT = """
import os, signal, sys, time
import torch
from memopt.checkpoint import AsyncCheckpointer
directory, mode = sys.argv[1:]
real = AsyncCheckpointer._write
def slow(self, job):
    if job.step == 2:
        time.sleep(0.5)  # the last save is still being written when the script ends
    real(self, job)
AsyncCheckpointer._write = slow
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
ckpt = AsyncCheckpointer(directory, fsync=False)
ckpt.save(1, model=model)
ckpt.wait()
with torch.no_grad():
    model.weight.add_(1.0)
ckpt.save(2, model=model)
if mode == "raise":
    raise RuntimeError("the training loop crashed (injected)")
if mode == "sigterm":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
"""


@pytest.mark.parametrize("mode", ["end", "raise", "sigterm"])
def test_last_save_is_published_when_the_script_ends_without_wait(tmp_path, mode) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), mode],
        cwd=ROOT, env=T.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == (1 if mode == "raise" else 0), proc.stderr[-3000:]
    assert "exiting without wait() or close()" in proc.stderr, proc.stderr[-3000:]
    assert "Aborted" not in proc.stderr and "terminate called" not in proc.stderr
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    want = model.weight.detach() + 1.0
    with AsyncCheckpointer(tmp_path) as ckpt:  # a fresh process reads the directory
        assert ckpt.latest() == 2
        ckpt.load(model=model)
    assert torch.equal(model.weight, want)


def test_exit_wait_is_bounded_and_says_the_save_was_dropped(tmp_path, monkeypatch) -> None:
    gate = threading.Event()
    real = AsyncCheckpointer._write

    def stuck(self: AsyncCheckpointer, job: Any) -> None:
        gate.wait(30)  # stands for a collective a peer never joins
        real(self, job)

    monkeypatch.setattr(AsyncCheckpointer, "_write", stuck)
    ckpt = AsyncCheckpointer(tmp_path, fsync=False)
    assert ckpt in exit_hook._live
    ckpt.save(1, extra={"s": 1})
    t = time.monotonic()
    with pytest.warns(UserWarning) as caught:
        assert not exit_hook.finish(ckpt, 0.3)
    assert "waiting until the save of step(s) [1]" in str(caught[0].message)
    assert "step(s) [1] NOT published" in str(caught[-1].message)
    assert time.monotonic() - t < 5
    assert ckpt.latest() is None
    gate.set()
    ckpt.close()
    assert ckpt not in exit_hook._live  # closed: nothing left for the exit hook
    assert ckpt.latest() == 1
