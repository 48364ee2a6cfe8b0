#!/usr/bin/env bash
# The DIDA unit's GPU checks as one prepared script, for a lent GPU (about 8 minutes on an H200):
#   1. the Triton kernels' tests on the GPU (the real compiler, not the CPU interpreter CI uses);
#   2. training-step cost against the static twins, eager, with the eager unit and with the Triton kernels;
#   3. the same compiled (torch.compile, default mode), both units.
# Each step's output is kept in OUTDIR/<step>.txt, also when a later step runs out of its time limit.
#
#   bash bench/gpu_checks.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}

$python -c 'import torch, triton, timm; print("torch", torch.__version__, "triton", triton.__version__,
            "timm", timm.__version__, torch.cuda.get_device_name())' 2>&1 | tee "$out/versions.txt"
# (less the ahead-of-time compile test: on a GPU every kernel test compiles for the card itself)
step kernels 150 $python -m pytest -q -p no:cacheprovider tests/test_dida_triton.py -k "not gpu_compiler"
cost="$python bench/bench_cost.py --device cuda --depths 18 --train-depths 18 --reps 21 --models-only"
step eager 90 $cost
step eager_triton 90 $cost --triton
step compiled 120 $cost --compile default
step compiled_triton 120 $cost --compile default --triton
