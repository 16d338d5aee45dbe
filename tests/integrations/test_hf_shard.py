"""``MemoptTrainer(memopt_shard={"stage": 2})`` under ``accelerate launch`` on 2 CPU processes:
equal to one process, and a fresh 2-rank Trainer resumes bitwise from a sharded snapshot."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from tests.integrations._launch import ROOT, accelerate_launch, run  # noqa: E402

SCRIPT = ROOT / "tests" / "integrations" / "hf_shard_train.py"


def test_sharded_trainer_two_ranks_matches_one_and_resumes(tmp_path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    run([sys.executable, str(SCRIPT), str(one), str(tmp_path / "w1")])
    run([*accelerate_launch(2), str(SCRIPT), str(two), str(tmp_path / "w2")])
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    assert len(a["norms"]) == 4 and min(a["norms"]) > 0.5  # max_grad_norm=0.5 clipped each step
    assert b["norms"] == pytest.approx(a["norms"], rel=1e-5)  # global norm over both shards
    for n, p in a["a"].items():
        torch.testing.assert_close(b["a"][n], p, atol=1e-5, rtol=0, msg=n)
        assert torch.equal(b["b"][n], b["a"][n]), f"2-rank resume differs at {n}"
