"""Write docs/config.md from memopt.config's dataclasses (``python scripts/gen_config_docs.py``).

``--check`` exits 1 when the committed file differs from what would be generated.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memopt.config.reference import reference_markdown

TARGET = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def main(argv: list[str]) -> int:
    text = reference_markdown()
    if "--check" in argv:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date; run python scripts/gen_config_docs.py")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
