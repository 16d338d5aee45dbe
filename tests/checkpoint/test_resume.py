"""Resume is exact: train N steps == train K, save, exit; load in a fresh process, train N-K."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint import _common as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ["adamw", "torch_adamw", "adamw8", "galore", "apollo_mini"]
K, N = 4, 9


def _run(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.checkpoint._worker", *args],
        cwd=ROOT,
        env=T.env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_resume_in_fresh_process_is_bit_exact(tmp_path) -> None:
    _run("save", str(tmp_path), str(K), *NAMES)
    out = tmp_path / "out"
    out.mkdir()
    _run("resume", str(tmp_path), str(N), str(out), *NAMES)
    # the workers run one thread; a GEMM's bits depend on the thread count, so the
    # uninterrupted reference runs with one thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare(out)
    finally:
        torch.set_num_threads(threads)


def _compare(out) -> None:  # type: ignore[no-untyped-def]
    for name in NAMES:
        model, opt, sched = T.make_all(name)
        T.train(model, opt, sched, 0, N)
        got = load_file(str(out / f"{name}.safetensors"))
        assert T.equal(T.full_params(model), got) == [], name
        # and the resumed run really moved away from the snapshot
        model_k, opt_k, sched_k = T.make_all(name)
        T.train(model_k, opt_k, sched_k, 0, K)
        assert T.equal(T.full_params(model_k), got), name
