#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install memopt into it.
#
#   bash scripts/setup.sh [EXTRAS]      EXTRAS defaults to "hf"; e.g. "dev", "dev,bench", "" (none)
#
# Idempotent: a second run reuses .venv and pip finds everything already satisfied.
# Torch goes in first, on its own: with no GPU we pin torch==2.13.0 (a CPU wheel that lies on
# local disk); a looser spec with no torch installed would pull a multi-GB CUDA build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

EXTRAS="${1-hf}"
VENV=.venv
PIP_QUIET=(-q --disable-pip-version-check)

log() { echo "[setup] $*"; }

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    if command -v python3.11 >/dev/null 2>&1; then echo python3.11; return; fi
    echo python3
}

if [[ ! -x "$VENV/bin/python" ]]; then
    py="$(pick_python)"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "[setup] error: $py is $("$py" -V 2>&1); memopt needs Python >= 3.10" >&2
        exit 1
    fi
    log "creating $VENV with $py ($("$py" -V 2>&1))"
    "$py" -m venv "$VENV"
else
    log "reusing $VENV ($("$VENV/bin/python" -V 2>&1))"
fi

PY="$VENV/bin/python"

log "upgrading pip"
"$PY" -m pip install "${PIP_QUIET[@]}" --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1; then
    log "GPU found (nvidia-smi): installing torch>=2.6 (CUDA build)"
    "$PY" -m pip install "${PIP_QUIET[@]}" "torch>=2.6"
else
    log "no GPU (no nvidia-smi): installing torch==2.13.0 (CPU wheel)"
    "$PY" -m pip install "${PIP_QUIET[@]}" "torch==2.13.0"
fi

if [[ -n "$EXTRAS" ]]; then
    target=".[$EXTRAS]"
else
    target="."
fi
log "installing memopt in editable mode: pip install -e \"$target\""
"$PY" -m pip install "${PIP_QUIET[@]}" -e "$target"

# The disk benchmarks compare against system packages: fio (ckpt_stall_bench, nvme_bench,
# offload_bench) and libaio-dev, which DeepSpeed's async_io op needs to build (nvme_bench's
# DeepSpeed peer).
# Installed only as root with apt-get; otherwise the missing ones are named.
apt_install() {  # apt_install PACKAGE WHAT-NEEDS-IT
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing $1 (apt-get) for $2"
        apt-get install -y -qq "$1" >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$1" >/dev/null 2>&1; } \
            || log "warning: apt-get could not install $1; $2 will stop and say so"
    else
        log "note: $1 is not installed ($2 needs it): install it with your package manager"
    fi
}
if [[ ",$EXTRAS," == *",bench,"* ]]; then
    command -v fio >/dev/null 2>&1 || apt_install fio "the disk benchmarks"
    # libaio-dev ships libaio.h, which DeepSpeed's async_io build compiles against
    if [[ ! -e /usr/include/libaio.h ]]; then
        apt_install libaio-dev "nvme_bench's DeepSpeed peer (its async_io op)"
    fi
fi

log "done: torch $("$PY" -c 'import torch; print(torch.__version__)'), python at $PY"
