"""Several processes on one checkpoint directory: a save in flight is nobody else's to delete.

- a reader process (``AsyncCheckpointer(dir)`` + ``latest``/``load``/``export_hf``, e.g. an
  evaluation job) and a new run's cleanup leave another process's save in flight alone (the
  reader's constructor used to delete its ``.tmp-step_*`` directory);
- crash leftovers are still removed, by the first save of a writer, never by a reader;
- 2 ranks: a save whose temporary directory lost a rank's file, or was removed and
  re-created, is not published, fails on every rank, and ``keep=1`` keeps the last good
  snapshot (rank 0 used to publish it without rank 0's files, reporting success).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

import memopt.checkpoint.checkpointer as CK
from memopt.checkpoint import AsyncCheckpointer, CheckpointError, publish, tmpdirs
from tests._harness.dist import run_distributed
from tests.checkpoint import _common as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READER = """
import sys
from torch import nn
from memopt.checkpoint import AsyncCheckpointer, export_hf
root, out = sys.argv[1:3]
with AsyncCheckpointer(root) as ck:
    print(ck.latest(), ck.load(model=nn.Linear(4, 4))["s"], bool(export_hf(root, out)))
"""


def _tmps(root: Any) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith((".tmp", ".trash")))


@pytest.mark.timeout(90)
def test_a_reader_process_leaves_a_save_in_flight_alone(tmp_path, monkeypatch) -> None:
    root = tmp_path / "ck"
    inside, gate = threading.Event(), threading.Event()
    real = CK.write_file

    def held(path: str, *args: Any, **kwargs: Any) -> int:
        crc = real(path, *args, **kwargs)
        if "step_0000000002" in path:  # step 2's tensor file is written, its JSON not yet
            inside.set()
            assert gate.wait(60)
        return crc

    monkeypatch.setattr(CK, "write_file", held)
    model = nn.Linear(4, 4)
    ck = AsyncCheckpointer(root, keep=1, save_rng=False)
    ck.save(1, model=model, extra={"s": 1})
    ck.wait()
    with torch.no_grad():
        model.weight.add_(1.0)
    ck.save(2, model=model, extra={"s": 2})
    try:
        assert inside.wait(30)
        reader = subprocess.run(
            [sys.executable, "-c", READER, str(root), str(tmp_path / "hf")],
            cwd=ROOT, env=T.env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        tmpdirs.clean_stale(str(root))  # what a new run's first save does: not ours either
        left = _tmps(root)
    finally:
        gate.set()
    assert reader.returncode == 0 and reader.stdout.split() == ["1", "1", "True"], reader.stderr
    tmp = f".tmp-step_0000000002-1-{ck._run}"  # (step, save number, this run's mark)
    assert left == [tmp, tmp + ".lock"]
    ck.wait()  # the save went on and was published
    assert ck.steps() == [2]
    other = nn.Linear(4, 4)
    assert ck.load(model=other)["s"] == 2 and torch.equal(other.weight, model.weight)
    ck.close()
    assert _tmps(root) == []


def test_crash_leftovers_are_removed_by_a_writer_not_a_reader(tmp_path) -> None:
    """Stale: a temporary directory whose lock file nobody holds, one without a lock file (an
    older memopt's) and a trash directory. Held: one a live writer has claimed."""
    for name in (".tmp-step_0000000007-0", ".tmp-step_0000000008-0", ".trash-0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rank_00000.json").write_text("{}")
    (tmp_path / ".tmp-step_0000000007-0.lock").write_text("")
    live = tmpdirs.claim(str(tmp_path / ".tmp-step_0000000009-0"))
    try:
        everything = _tmps(tmp_path)
        with AsyncCheckpointer(tmp_path, save_rng=False) as ck:
            assert ck.latest() is None and _tmps(tmp_path) == everything  # reading: untouched
            ck.save(1, extra={"s": 1})
            ck.wait()
        publish.wait_deletions()
        assert _tmps(tmp_path) == [".tmp-step_0000000009-0", ".tmp-step_0000000009-0.lock"]
    finally:
        tmpdirs.release(live)
    shutil.rmtree(live.tmp)  # (the writer would have published or removed it)
    assert _tmps(tmp_path) == []  # release removed the lock file


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert time.monotonic() < deadline, path
        time.sleep(0.002)


def _lost_files(rank: int, world: int, root: str) -> dict[str, Any]:
    real = CK.write_file

    def meddle(path: str, *args: Any, **kwargs: Any) -> int:
        tmp = os.path.dirname(path)
        if rank == 1 and os.path.basename(tmp).startswith(".tmp-step_000000000"):
            step = int(os.path.basename(tmp)[10:20])
            if step in (2, 3):
                _wait_for(os.path.join(tmp, "rank_00000.json"))  # rank 0 has written
            if step == 2:  # rank 0's tensor file vanishes
                os.remove(os.path.join(tmp, "rank_00000.safetensors"))
            elif step == 3:  # the directory is removed and re-created under the save
                shutil.rmtree(tmp)
                os.makedirs(tmp)
        return real(path, *args, **kwargs)

    CK.write_file = meddle
    said = []
    try:
        ck = AsyncCheckpointer(root, keep=1, fsync=False, save_rng=False)
        model = nn.Linear(8, 8)
        for step in (1, 2, 3):
            ck.save(step, model=model, extra={"s": step})
            try:
                ck.wait()
                said.append(f"{step}: ok")
            except CheckpointError as e:
                said.append(f"{step}: {e}")
    finally:
        CK.write_file = real
    steps = ck.steps()
    loaded = ck.load(model=nn.Linear(8, 8))["s"]
    ck.save(4, model=model, extra={"s": 4})
    ck.close()
    return {"said": said, "steps": steps, "loaded": loaded, "after": ck.steps(),
            "left": _tmps(root)}  # fmt: skip


@pytest.mark.timeout(120)
def test_a_save_missing_a_rank_file_is_not_published_on_any_rank(tmp_path) -> None:
    results = run_distributed(_lost_files, world_size=2, timeout_s=90, args=(str(tmp_path),))
    for rank, out in enumerate(results):
        said = out["said"]
        assert said[0] == "1: ok", (rank, said)
        for step, line in ((2, said[1]), (3, said[2])):  # (a rank's own failure, or the
            # outcome rank 0 broadcast)
            assert line.startswith(f"{step}: checkpoint step {step}"), (rank, said)
            assert "not published" in line, (rank, said)
        assert out["steps"] == [1] and out["loaded"] == 1, (rank, out)  # keep=1 kept it
        assert out["after"] == [4] and out["left"] == [], (rank, out)
        for line in said[1:3]:  # rank 0's check before the rename (or the writer's own)
            assert "rank 0's rank_00000.safetensors is missing" in line or "vanished" in line \
                or "removed while rank" in line, (rank, line)  # fmt: skip
