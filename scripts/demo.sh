#!/usr/bin/env bash
# The README's demo: set up .venv (torch CPU + memopt[hf]) with scripts/setup.sh, then train a
# small LLaMA on CPU with a memopt optimizer and with AdamW, and print held-out loss and
# optimizer-state memory side by side. Takes about 2-4 minutes on 2 cores after setup.
#
#   bash scripts/demo.sh                           # GaLore vs AdamW
#   bash scripts/demo.sh --optimizer apollo_mini   # any of: galore apollo apollo_mini frugal natural_galore
#   bash scripts/demo.sh --steps 300               # arguments go to examples/demo.py (--help)
#
# Works from any directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup.sh" hf
cd "$here/.."
exec .venv/bin/python examples/demo.py "$@"
