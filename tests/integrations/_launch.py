"""Run a script (plain or under ``accelerate launch``) with a hard timeout, for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def run(cmd: list[str]) -> None:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} hung for {TIMEOUT_S}s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{cmd} failed:\n{out[-6000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_launch(nproc: int) -> list[str]:
    """``accelerate launch`` for ``nproc`` CPU processes: ``--multi_gpu`` is torchrun underneath;
    the scripts create ``Accelerator(cpu=True)`` (``--cpu`` with several processes needs MPI)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no"]
    return cmd + ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
