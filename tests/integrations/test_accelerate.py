"""memopt.integrations.accelerate: a 2-process ``accelerate launch`` run (gloo, CPU) against a
single-process run of the same script, and the refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from memopt.integrations.accelerate import prepare  # noqa: E402
from tests.integrations._launch import ROOT, accelerate_launch, run  # noqa: E402

SCRIPT = ROOT / "tests" / "integrations" / "accelerate_train.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The script's OUT files: one process (stage 2), and 2 ranks at stage 3 (FSDP2 units,
    memopt's FSDPOptimizer); test_hf_shard.py runs stage 2 on 2 ranks."""
    tmp = tmp_path_factory.mktemp("accelerate")
    one, two = tmp / "one.pt", tmp / "two.pt"
    run([sys.executable, str(SCRIPT), str(one)])
    run([*accelerate_launch(2), str(SCRIPT), str(two), "3"])
    return one, two


def test_two_process_launch_matches_single_process(runs: tuple[Path, Path]) -> None:
    a, b = (torch.load(p) for p in runs)
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


def test_stage3_save_routes_write_full_weights(runs: tuple[Path, Path]) -> None:
    """accelerator.save_model and save_pretrained(state_dict=accelerator.get_state_dict(model))
    after prepare(stage=3) write full weights (the DTensor shards gathered to rank 0) that
    from_pretrained loads bitwise; save_pretrained without state_dict is refused by name."""
    from transformers import AutoModelForCausalLM

    one, two = runs
    b = torch.load(two)
    assert b["state_sizes"] == [len(b["params"]), 0]  # rank 0 holds it all, rank 1 nothing
    assert b["state_kinds"] == ["Tensor"]  # whole tensors, not DTensor shards
    assert "stage-3" in b["refused"] and "state_dict=accelerator.get_state_dict" in b["refused"]
    assert not Path(f"{two}.plain").exists()  # refused before anything was written
    dirs = [Path(f"{two}.save_model"), Path(f"{two}.save_pretrained")]
    a = torch.load(one)  # one process (no DTensor): accelerate's own path, the idiom works
    assert a["refused"] is None and a["state_sizes"] == [len(a["params"])]
    checks = [(b["params"], d) for d in dirs] + [(a["params"], Path(f"{one}.plain"))]
    for params, where in checks:
        loaded = dict(AutoModelForCausalLM.from_pretrained(where).named_parameters())
        assert loaded.keys() == params.keys(), where
        for n, p in params.items():
            assert torch.equal(loaded[n].detach(), p), f"{where}: {n}"


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
