"""``memopt report`` with ``--stage 1|2|3``, ``--offload`` and ``--offload-params`` on one process.

``report`` offered these flags but could never run them: "stage 1 with world size 1 needs that
many ranks" (a contradiction), and ``--offload-params`` needed a process group that report
never started (sweep44 F2). It now runs them on a one-rank group, as ``memopt run
--nproc-per-node 1`` does, and ends that group again."""

from __future__ import annotations

import json
import re

import pytest
import torch.distributed as dist

from memopt.cli import _workload, main
from memopt.cli._workload import Workload

TINY = ["--hidden", "64", "--layers", "2", "--vocab", "500", "--batch-size", "2", "--seq-len", "16",
        "--steps", "2"]  # fmt: skip


def _report(tmp_path, *flags: str) -> dict:
    out = tmp_path / "r"
    rc = main(["report", *TINY, *flags, "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    md = (out / "timeline.md").read_text()
    ratio = re.search(r"\| host \| [^|]+ \| [^|]+ \| ([0-9.]+) \|", md)
    assert ratio is not None and float(ratio.group(1)) > 0, md
    return json.loads((tmp_path / "r.json").read_text())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("flags", [("--stage", "1"), ("--stage", "2"), ("--stage", "3"),
                                   ("--stage", "1", "--offload", "cpu")])  # fmt: skip
def test_report_runs_every_stage_on_one_process(tmp_path, flags) -> None:
    d = _report(tmp_path, *flags)
    assert d["estimate"]["config"]["stage"] == int(flags[1])
    assert d["measured_peak"]["host"] > 0
    assert not dist.is_initialized()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_runs_parameter_offload_on_a_one_rank_group(tmp_path, monkeypatch) -> None:
    seen: list[int] = []
    shard = _workload.shard_kwargs

    def spy(w: Workload) -> dict:  # the group is up while memopt.shard runs
        seen.append(dist.get_world_size() if dist.is_initialized() else 0)
        return shard(w)

    monkeypatch.setattr(_workload, "shard_kwargs", spy)
    d = _report(tmp_path, "--stage", "3", "--offload-params", "cpu")
    assert d["estimate"]["config"]["offload_params"] == "cpu"
    assert seen == [1, 1]  # warm-up and the measured run, both on one rank
    assert not dist.is_initialized()  # ended again


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_leaves_a_group_it_did_not_start(tmp_path) -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _report(tmp_path, "--stage", "2")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_more_ranks_are_refused_with_what_to_use(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["report", *TINY, "--stage", "2", "--world-size", "4"])
    text = str(e.value.code)
    assert "measures this one process" in text and "memopt estimate --world-size 4" in text
    assert "memopt run" in text and "come later" not in text
    assert not dist.is_initialized()


def test_workload_run_names_the_rank_mismatch() -> None:
    with pytest.raises(ValueError, match=r"--world-size 2, but this process runs 1 rank\(s\)"):
        _workload.run(Workload(hidden=64, layers=1, vocab=500, stage=2, world_size=2), 1, None)
