"""The Triton kernels agree with the torch path (CPU, TRITON_INTERPRET=1, subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # in the dev extra; CI installs it

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_match_torch_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MEMOPT_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.optim.triton_checks"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "match the torch path" in proc.stdout


def test_forced_backend_validates_its_value(monkeypatch):
    import torch

    from memopt.optim import kernels

    monkeypatch.setenv("MEMOPT_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="MEMOPT_KERNELS"):
        kernels.backend(torch.zeros(1))
    monkeypatch.setenv("MEMOPT_KERNELS", "auto")
    assert kernels.backend(torch.zeros(1)) == "torch"  # CPU tensors default to torch


def test_kernel_switch_is_read_forgivingly_and_checked_everywhere(monkeypatch):
    import torch

    from memopt.optim import kernels

    monkeypatch.setenv("MEMOPT_KERNELS", " Torch ")
    assert kernels.backend(torch.zeros(1)) == "torch" and not kernels.native_cpu_on()
    monkeypatch.setenv("MEMOPT_KERNELS", "bogus")  # the native switch (int8 AdamW) read it blind
    with pytest.raises(ValueError, match="MEMOPT_KERNELS must be auto, torch or triton"):
        kernels.native_cpu_on()
    monkeypatch.setenv("MEMOPT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="only under its interpreter"):
        kernels.backend(torch.zeros(1))
