#!/usr/bin/env bash
# Set up the dev environment, then run the test suite.
#
#   bash scripts/test.sh [PYTEST ARGS...]     e.g. bash scripts/test.sh tests/optim -k galore
#
# MEMOPT_SKIP_SETUP=1 skips the setup step (faster reruns once .venv is in place).
# OMP_NUM_THREADS is left as the caller set it (unset by default); the distributed harness pins
# it to 1 inside its worker processes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${MEMOPT_SKIP_SETUP:-0}" != "1" ]]; then
    bash scripts/setup.sh dev
fi

set +e
.venv/bin/python -m pytest -q -x --timeout=300 "$@"
rc=$?
set -e

if [[ $rc -eq 5 ]]; then
    echo "[test] error: pytest collected no tests (exit code 5); treating that as a failure" >&2
    exit 1
fi
exit $rc
