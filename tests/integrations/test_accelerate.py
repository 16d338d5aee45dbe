"""memopt.integrations.accelerate: a 2-process ``accelerate launch`` run (gloo, CPU) against a
single-process run of the same script, and the refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from memopt.integrations.accelerate import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "integrations" / "accelerate_train.py"
TIMEOUT_S = 240


def _run(cmd: list[str]) -> None:
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


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_launch_matches_single_process(tmp_path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, str(SCRIPT), str(one)])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_port())]
    _run([*launch, str(SCRIPT), str(two)])
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    assert b["kind"] == "DistributedType.MULTI_CPU"
    assert len(a["norms"]) == 3 and min(a["norms"]) > 0.5  # clipping was active every step
    assert a["norms"] == pytest.approx(b["norms"], rel=1e-5)
    init = dict(
        __import__("tests.integrations._tiny", fromlist=["x"]).tiny_llama(0).named_parameters()
    )
    for n, p in a["params"].items():
        assert not torch.equal(p, init[n].detach()), f"{n} did not train"
        torch.testing.assert_close(b["params"][n], p, atol=1e-5, rtol=0, msg=n)


def _fake(kind: str = "NO", scaler: object = None, procs: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_type=SimpleNamespace(name=kind), scaler=scaler, num_processes=procs
    )


def test_prepare_refuses_other_sharding_and_fp16_scaler() -> None:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kind in ("DEEPSPEED", "FSDP"):
        with pytest.raises(ValueError, match="memopt does the sharding"):
            prepare(_fake(kind), model, opt)
    with pytest.raises(NotImplementedError, match="bf16"):
        prepare(_fake(scaler=object()), model, opt)
    with pytest.raises(ValueError, match="cpu=True"):
        prepare(_fake(procs=2), model, opt)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        prepare(_fake(), model, object())  # type: ignore[arg-type]
