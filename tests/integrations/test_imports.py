"""``import memopt`` and the integration package's shared helpers need neither transformers nor
accelerate (DESIGN.md section 2: layer-5 adapters import their ecosystems lazily)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_memopt_imports_without_transformers_or_accelerate() -> None:
    code = (
        "import sys, memopt, memopt.integrations, memopt.integrations.accelerate\n"
        "bad = [m for m in ('transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
