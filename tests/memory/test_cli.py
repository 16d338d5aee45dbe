"""``memopt estimate`` / ``memopt report`` smoke tests (in process, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from memopt.cli import main, parser

TINY = ["--hidden", "64", "--layers", "2", "--vocab", "500", "--batch-size", "2", "--seq-len", "16"]


def test_estimate_prints_table_and_json(tmp_path, capsys) -> None:
    out = tmp_path / "e.json"
    rc = main(["estimate", *TINY, "--optimizer", "galore", "--rank", "16", "--stage", "2",
               "--world-size", "8", "--json", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "world size 8" in text and "| optimizer_state |" in text
    d = json.loads(out.read_text())
    assert d["world_size"] == 8 and d["config"]["optimizer"] == "galore"
    assert d["peak"]["device"] == sum(d["breakdown"]["device"].values())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_writes_png_and_table(tmp_path, capsys) -> None:
    rc = main(["report", *TINY, "--steps", "2", "--out", str(tmp_path / "r"),
               "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "r" / "timeline.png").stat().st_size > 5000
    md = (tmp_path / "r" / "timeline.md").read_text()
    assert "| step 1 |" in md and "predicted / measured" in md
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["measured_peak"]["host"] > 0 and d["estimate"]["peak"]["device"] > 0


def test_unknown_optimizer_rejected() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["estimate", "--optimizer", "lion"])


def test_console_script_registered() -> None:
    meta = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["memopt"] == "memopt.cli:main"
