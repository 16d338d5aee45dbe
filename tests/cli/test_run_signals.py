"""Stopping ``memopt run`` stops the run (sweep29 F2/F3), end to end on a tiny recipe.

Before: SIGTERM to the launcher killed the launcher alone (it waited in ``subprocess.call``),
leaving torchrun and the rank training, orphaned; and a rank (in a session of its own, from
torchrun) outlived a SIGKILL of torchrun, writing snapshots that a re-run then shared.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

from memopt.cli._runguard import DirectoryInUseError, probe  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")

ROOT = Path(__file__).resolve().parents[2]
START_S, STOP_S = 240, 20
TINY = """
model: {preset: llama-tiny, device: cpu, overrides: {hidden_size: 32, intermediate_size: 64,
        num_hidden_layers: 1}}
data: {source: stdlib, max_bytes: 20000}
train: {steps: 1000000, batch_size: 1, seq_len: 16, log_every: 1}
optimizer: {name: adamw}
checkpoint: {directory: ck, every_n_steps: 1000000, fsync: false}
"""


def _running(p: psutil.Process) -> str:
    """``p``'s command line while it runs (not a zombie), else ''."""
    try:
        return "" if p.status() == psutil.STATUS_ZOMBIE else " ".join(p.cmdline()[:6])
    except psutil.NoSuchProcess:
        return ""


class Launch:
    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "r.yaml").write_text(TINY)
        self.log = tmp_path / "out.txt"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memopt.cli", "run", "r.yaml"], cwd=tmp_path, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.seen: list[psutil.Process] = []

    def training(self) -> tuple[psutil.Process, psutil.Process]:
        """Wait for step 2; (the torchrun process, the rank)."""
        deadline = time.monotonic() + START_S
        while "step 2/" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no step 2 in {START_S}s"
            time.sleep(0.2)
        me = psutil.Process(self.proc.pid)
        self.seen = [me, *me.children(recursive=True)]
        torchrun = next(p for p in self.seen if "torch.distributed.run" in p.cmdline())
        rank = next(p for p in self.seen if p.ppid() == torchrun.pid
                    and "memopt.cli.train" in p.cmdline())  # fmt: skip
        return torchrun, rank

    def alive_after(self, seconds: float) -> list[str]:
        """The command lines of the launch's processes still running ``seconds`` on (the
        launcher itself is reaped by ``self.proc``, which keeps its exit status)."""
        deadline = time.monotonic() + seconds
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass
        others = [p for p in self.seen if p.pid != self.proc.pid]
        _, alive = psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))
        if self.proc.poll() is None:
            alive.append(psutil.Process(self.proc.pid))
        return [text for p in alive if (text := _running(p))]

    def kill_all(self) -> None:  # (by pid, every process this launch started)
        for p in self.seen:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    run = Launch(tmp_path)
    try:
        yield run
    finally:
        run.kill_all()


def test_sigterm_to_memopt_run_stops_torchrun_and_the_ranks(launch: Launch, tmp_path) -> None:
    torchrun, rank = launch.training()
    with pytest.raises(DirectoryInUseError, match=f"pid {rank.pid} on host"):
        probe(str(tmp_path / "ck"))  # the live run holds its checkpoint directory
    os.kill(launch.proc.pid, signal.SIGTERM)
    left = launch.alive_after(STOP_S)
    assert left == [], f"still running {STOP_S}s after SIGTERM to memopt run: {left}"
    assert launch.proc.returncode not in (None, 0)  # (torchrun's: stopped by a signal)
    probe(str(tmp_path / "ck"))  # released with the run


def test_ranks_die_with_torchrun(launch: Launch) -> None:
    torchrun, rank = launch.training()
    torchrun.send_signal(signal.SIGKILL)  # (what a kill -9 of the launcher's group reaches)
    left = launch.alive_after(STOP_S)
    assert left == [], f"still running {STOP_S}s after SIGKILL to torchrun: {left}"
