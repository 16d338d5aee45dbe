"""``MemoptTrainer`` / ``create_optimizer`` under HF's DeepSpeed integration (sweep45 F1):
refused with the migration route, which itself trains GaLore on whole matrices."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from tests.integrations._launch import ROOT, run  # noqa: E402

SCRIPT = ROOT / "tests" / "integrations" / "hf_deepspeed_refusal.py"


def test_deepspeed_training_arguments_are_refused_with_the_memopt_route(tmp_path) -> None:
    run([sys.executable, str(SCRIPT), str(tmp_path)])
