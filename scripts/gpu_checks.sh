#!/usr/bin/env bash
# The checks that need a CUDA GPU: the GPU tests, then the GPU benchmarks. Logs go to $OUT
# (default gpu_logs/). Run from the repository root on a machine whose python3 has a CUDA
# torch; the peers (galore-torch, apollo-torch, bitsandbytes) must be importable.
#
#   bash scripts/gpu_checks.sh [tests|bench|optim|profile|all]      (default: all)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # memopt from this checkout
what=${1:-all}
rc=0

run() {  # run NAME CMD...: tee the output into $out/NAME, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name"
    local code=${PIPESTATUS[0]}
    [[ $code -eq 0 ]] || { echo "== $name FAILED (exit $code)"; rc=1; }
}

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1

if [[ $what == tests || $what == all ]]; then
    run gpu_tests.log "$py" -m pytest -q -p no:cacheprovider --timeout=900 tests/gpu
fi
if [[ $what == bench || $what == all ]]; then
    run kernel_bw.md "$py" benchmarks/kernel_bw.py --device cuda
    # small batch (the step's peak is gradients + state) and large batch (activations)
    run in_backward_small.md "$py" benchmarks/in_backward_mem.py --device cuda --steps 3
    run in_backward_large.md "$py" benchmarks/in_backward_mem.py --device cuda --hidden 1024 \
        --layers 16 --batch 4 --seq 512 --steps 3
fi
if [[ $what == optim || $what == all ]]; then
    # Whole LLaMA-350M (24 blocks), and one LLaMA-1B block, at the GaLore paper's gap 200.
    # (SIGINT at the time limit: the benchmark keeps and reports the steps it timed)
    # The whole model: the optimizers with a step-time target and their references (the
    # SVD-based ones spend minutes in full SVDs of 168 matrices; one block below has them all).
    run optim_350m.md timeout -s INT "${OPTIM_LIMIT:-330}" "$py" benchmarks/optim_bench.py \
        --device cuda --sizes 350m --blocks 24 --gaps 200 --pool 2 --log-every 100 \
        --no-breakdown --only "${OPTIM_ONLY:-AdamW,GaLore rsvd,GaLore subspace,galore-torch,APOLLO}" \
        --out "$out/optim_350m.json"
    run optim_1b.md timeout -s INT "${OPTIM_LIMIT:-330}" "$py" benchmarks/optim_bench.py \
        --device cuda --sizes 1b --gaps 200 --pool 4 --log-every 100 --refresh-reps 1 \
        --out "$out/optim_1b.json"
fi
if [[ $what == profile || $what == all ]]; then
    run profile_350m.md "$py" benchmarks/profile_step.py --device cuda --size 350m --blocks 24 \
        --steps 3 --only "torch AdamW (fused),memopt AdamW,apollo-torch APOLLO,memopt APOLLO,\
apollo-torch APOLLO-Mini,memopt APOLLO-Mini,bnb AdamW8bit,memopt AdamW int8"
fi
exit $rc
