"""memopt.integrations.accelerate: a 2-process ``accelerate launch`` run (gloo, CPU) against a
single-process run of the same script, and the refusals."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from memopt.integrations.accelerate import prepare  # noqa: E402
from tests.integrations._launch import ROOT, accelerate_launch, run  # noqa: E402

SCRIPT = ROOT / "tests" / "integrations" / "accelerate_train.py"


def test_two_process_launch_matches_single_process(tmp_path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run([sys.executable, str(SCRIPT), str(one)])
    # stage 3 (FSDP2 units, memopt's FSDPOptimizer) on 2 ranks; test_hf_shard.py runs stage 2
    run([*accelerate_launch(2), str(SCRIPT), str(two), "3"])
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
