"""The run lock outlives the last asynchronous save (session 16 defect, fixed in session 17).

A rank of ``memopt run`` whose training raises (here: its data stream fails in step 2) still
has the snapshot of step 1 in flight; the checkpoint exit hook finishes it at interpreter exit.
Before, rank 0 released ``checkpoint.directory``'s lock as the exception left ``train()``,
seconds before that save was published, so a re-run could take the lock and write the same
directory alongside it. Checked end to end on the real entry point (``python -m
memopt.cli.train``, run through ``runpy`` as ``__main__`` in a child), with the disk write of
the snapshot held back until the test lets it go; and the same for a run that ends normally
(its last save is finished by ``Setup.close()`` inside the locked block: held before too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memopt.checkpoint.publish import step_name
from memopt.cli import _runguard
from memopt.cli._runguard import DirectoryInUseError, probe

pytestmark = pytest.mark.skipif(_runguard.fcntl is None, reason="flock is POSIX")

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 180  # start-up of the child (imports torch) and the save, on a busy 2-core machine
TINY = """
model: {preset: llama-tiny, device: cpu, overrides: {hidden_size: 32, intermediate_size: 64,
        num_hidden_layers: 1}}
data: {source: stdlib, max_bytes: 20000}
train: {steps: 3, batch_size: 1, seq_len: 16}
optimizer: {name: adamw}
checkpoint: {directory: ck, every_n_steps: 1, fsync: false}
"""

# The child: the disk write of step ``argv[4]`` waits for the file ``go`` (at most 60 s: never
# a hang); with ``argv[5] == "fail"`` the data stream raises at its second batch (step 2, after
# the save of step 1 was handed to the checkpointer) and an excepthook marks the moment the
# exception reached the top level (every ``finally`` of ``main()`` has run by then); then
# memopt.cli.train runs as ``__main__``.
_CHILD = textwrap.dedent("""
    import runpy, sys, time
    from pathlib import Path
    import memopt.config.workload as workload
    from memopt.checkpoint.checkpointer import AsyncCheckpointer

    go, writing, raised = (Path(a) for a in sys.argv[1:4])
    block, fail = int(sys.argv[4]), sys.argv[5] == "fail"
    write, stream = AsyncCheckpointer._write, workload.batches

    def slow_write(self, job):
        if job.step == block:
            writing.write_text(str(job.step))
            deadline = time.monotonic() + 60
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        write(self, job)

    def failing_batches(*args, **kwargs):
        source = stream(*args, **kwargs)
        yield next(source)
        raise RuntimeError("boom: the data stream failed in step 2")

    def excepthook(kind, value, tb):
        raised.write_text(repr(value))
        sys.__excepthook__(kind, value, tb)

    AsyncCheckpointer._write = slow_write
    if fail:
        workload.batches = failing_batches
    sys.excepthook = excepthook
    sys.argv = ["memopt.cli.train", *sys.argv[6:]]
    runpy.run_module("memopt.cli.train", run_name="__main__", alter_sys=True)
""")


def _wait_for(path: Path, child: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists() or not path.read_text():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"child exited ({child.returncode}) before {path.name}:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"no {path.name} within {WAIT_S} s"
        time.sleep(0.05)


@pytest.mark.parametrize("fail", [True, False], ids=["training-raises", "training-ends"])
def test_lock_is_held_until_the_last_save_is_published(tmp_path: Path, fail: bool) -> None:
    (tmp_path / "r.yaml").write_text(TINY)
    go, writing, raised = tmp_path / "go", tmp_path / "writing", tmp_path / "raised"
    ck, block = tmp_path / "ck", 1 if fail else 3  # (raises in step 2; else the last save)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)  # one process, no group: the entry point alone decides
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(go), str(writing), str(raised), str(block),
         "fail" if fail else "end", "r.yaml"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(raised if fail else writing, child)
        if fail:
            assert "boom" in raised.read_text()
        _wait_for(writing, child)
        assert writing.read_text() == str(block)  # that save's disk write is held back
        assert child.poll() is None  # (raised: the exit hook waits for it; else close() does)
        # before, after a raise: the lock was gone here, the save still to be published
        with pytest.raises(DirectoryInUseError, match=f"pid {child.pid} on host"):
            probe(str(ck))
        go.write_text("")
        out, err = child.communicate(timeout=WAIT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
    assert child.returncode == (1 if fail else 0), err[-3000:]
    published = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
    assert published[-1:] == [step_name(block)], sorted(os.listdir(ck))
    if fail:
        assert "RuntimeError: boom" in err and published == [step_name(1)]
        assert "waiting until the save of step(s) [1]" in err  # (the exit hook published it)
    else:
        assert "done: steps 0->3" in out and not raised.exists()
    probe(str(ck))  # released once the process is gone
