"""``memopt.cli._runguard``: the checkpoint directory's run lock and the ranks' parent-death
signal (sweep29 F3), checked without a launch (the end-to-end checks: test_run_signals.py)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memopt import Config
from memopt.cli import _runguard, launch
from memopt.cli import main as cli_main
from memopt.cli._runguard import LOCK_NAME, DirectoryInUseError, hold, probe
from memopt.cli.train import main as train_main
from tests._harness.dist import run_distributed

pytestmark = pytest.mark.skipif(_runguard.fcntl is None, reason="flock is POSIX")

TINY = """
model: {preset: llama-tiny, device: cpu, overrides: {hidden_size: 32, intermediate_size: 64,
        num_hidden_layers: 1}}
data: {source: stdlib, max_bytes: 20000}
train: {steps: 2, batch_size: 1, seq_len: 16}
checkpoint: {directory: ck, every_n_steps: 1, fsync: false}
"""


def test_second_holder_is_refused_naming_directory_pid_and_host(tmp_path: Path) -> None:
    d = str(tmp_path)
    with hold(d):
        held = (tmp_path / LOCK_NAME).read_text()
        assert held.startswith(f"pid {os.getpid()} on host {socket.gethostname()}")
        for attempt in (lambda: probe(d), lambda: hold(d).__enter__()):
            with pytest.raises(DirectoryInUseError) as e:
                attempt()
            msg = str(e.value)
            assert f"checkpoint.directory {d} is in use by another run" in msg
            assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg
            assert "pass another checkpoint.directory" in msg
    probe(d)  # released at the end of the block
    with hold(d):  # and can be taken again
        pass
    with hold(None):  # no directory: nothing to hold
        pass


def test_lock_follows_the_process_not_the_file(tmp_path: Path) -> None:
    """A holder killed with SIGKILL releases it (the kernel drops a dead process's flock)."""
    code = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("rg", {_runguard.__file__!r})
        rg = importlib.util.module_from_spec(spec); spec.loader.exec_module(rg)
        with rg.hold({str(tmp_path)!r}):
            print("held", flush=True); time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryInUseError, match=f"pid {child.pid} on host"):
            probe(str(tmp_path))
    finally:
        child.kill()
        child.wait(timeout=30)
    probe(str(tmp_path))


def test_filesystem_without_flock_warns_and_runs(tmp_path: Path, monkeypatch) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_runguard.fcntl, "flock", no_flock)
    with pytest.warns(RuntimeWarning, match="cannot lock .*a second run in this checkpoint"):
        with hold(str(tmp_path)):
            pass


def test_memopt_run_refuses_a_directory_in_use(tmp_path: Path, monkeypatch) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    monkeypatch.chdir(tmp_path)
    launched: list[list[str]] = []
    monkeypatch.setattr(launch, "_exec", lambda cmd: launched.append(cmd) or 0)
    (tmp_path / "ck").mkdir()
    with hold(str(tmp_path / "ck")):
        with pytest.raises(SystemExit) as e:
            cli_main(["run", str(recipe)])
        err = str(e.value.code)
        assert err.startswith(f"memopt run: {recipe}: checkpoint.directory {tmp_path / 'ck'} is "
                              f"in use by another run: pid {os.getpid()}")  # fmt: skip
        assert launched == []  # refused before torchrun starts
        # a rank started by hand (or a launch that raced the check) stops before training
        with pytest.raises(SystemExit, match="memopt run: checkpoint.directory .* in use"):
            train_main([str(recipe)])
        assert not any(p.name.startswith("step_") for p in (tmp_path / "ck").iterdir())
    assert cli_main(["run", str(recipe)]) == 0 and len(launched) == 1  # free again
    # the multi-node launcher leaves the check to global rank 0 (node 0's lock is live there)
    with hold(str(tmp_path / "ck")):
        assert cli_main(["run", str(recipe), "--nnodes", "2", "--node-rank", "1",
                         "--master-addr", "127.0.0.1", "--master-port", "29555"]) == 0
    assert len(launched) == 2


def _rank_lock(rank: int, world: int, held: str, free: str) -> list[str]:
    from memopt.cli.train import _run_lock

    out = []
    for directory in (held, free):
        config = Config.from_dict({"checkpoint": {"directory": directory}})
        try:
            with _run_lock(config, rank):
                out.append("trained")
        except DirectoryInUseError as e:
            out.append(str(e))
    return out


def test_every_rank_stops_when_rank_0_finds_the_lock_taken(tmp_path: Path) -> None:
    held, free = tmp_path / "held", tmp_path / "free"
    held.mkdir()
    free.mkdir()
    with hold(str(held)):
        got = run_distributed(_rank_lock, 2, args=(str(held), str(free)), timeout_s=120)
    assert got[0] == got[1], got  # rank 1 raises rank 0's error (it never tries the lock)
    assert f"{held} is in use by another run: pid {os.getpid()}" in got[0][0]
    assert got[0][1] == "trained"


_CHILD = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("rg", sys.argv[1])
    rg = importlib.util.module_from_spec(spec); spec.loader.exec_module(rg)
    print(rg.die_with_parent(), flush=True)
    time.sleep(60)
""")
_PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    print(child.pid, child.stdout.readline().strip(), flush=True)
    time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("agent", [True, False])
def test_rank_dies_with_its_parent(agent: bool, monkeypatch) -> None:
    """A stand-in for torchrun (the child in a session of its own, as torchrun's ranks are)
    killed with SIGKILL takes the rank with it, when the rank runs under an agent."""
    if agent:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv(_runguard.PARENT_ENV, raising=False)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, _runguard.__file__],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert parent.stdout is not None
    pid_text, requested = parent.stdout.readline().split()
    child = int(pid_text)
    try:
        assert requested == str(agent)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + (10 if agent else 1.5)
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(child) is not agent  # (without an agent: kept, as before)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_rank_whose_launcher_is_already_gone_stops() -> None:
    """``memopt run`` exports its pid (torchrun's, after the exec): a rank whose parent is
    another process (the launcher died before the rank's request) stops at once."""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    for parent, expect_rc in ((os.getpid() + 10**6, 1), (os.getpid(), 0)):
        env[_runguard.PARENT_ENV] = str(parent)
        code = _CHILD.replace("time.sleep(60)", "")
        got = subprocess.run([sys.executable, "-c", code, _runguard.__file__], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert got.returncode == expect_rc, got.stderr
        if expect_rc:
            assert f"the launcher (torchrun, pid {parent}) exited before this rank" in got.stderr
        else:
            assert got.stdout.strip() == "True"
