#!/usr/bin/env bash
# The DIDA unit's GPU checks as one prepared script, for a lent GPU (on an H200, 2026-12-04, the default steps and
# reduce_overhead took 9 minutes together):
#   kernels          the Triton kernels' tests on the GPU (the real compiler and card, not the CPU interpreter CI uses)
#   eager            training-step cost against the static twins, eager, the eager unit
#   eager_triton     the same with the Triton kernels
#   compiled         the same through torch.compile (default mode), the eager unit
#   compiled_triton  the same, the Triton kernels
#   reduce_overhead, reduce_overhead_triton   torch.compile(mode='reduce-overhead') (CUDA graphs), not run by default
#   parts, parts_triton   where dida_digitnet_compact's extra step time goes (bench_branch_parts.py), eager unit /
#                         Triton kernels, each also with its 1x1s as batched matmuls, not run by default
#   profile, profile_triton, profile_compiled   each step's kernel time, kernels and launches against the static
#                    twin (bench_step_profile.py): eager with the eager unit / with the Triton kernels /
#                    torch.compile default, not run by default
#   inference        forward latency and ops of both models' inference forms (timm's reparameterize_model), eager,
#                    not run by default
# Each step's output is kept in OUTDIR/<step>.txt, also when a later step runs out of its time limit; a step that
# fails or runs out of time ends its file with a line that says so, and the script then exits 1 after the other steps.
# A step cut short by the end of the whole script leaves OUTDIR/<step>.txt.part.
# The limits of the default steps add up to 730 s: where a command may run 600 s at most, split them over two calls
# (`kernels eager eager_triton`, then `compiled compiled_triton`), and give an OUTDIR that the machine sends back.
#
#   bash bench/gpu_checks.sh OUTDIR                                   # the default steps
#   bash bench/gpu_checks.sh OUTDIR reduce_overhead reduce_overhead_triton
#   bash bench/gpu_checks.sh OUTDIR parts parts_triton inference
#   bash bench/gpu_checks.sh OUTDIR profile profile_triton profile_compiled
set -uo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUTDIR [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels eager eager_triton compiled compiled_triton)
# each timed step: its time limit and its options to bench_cost.py (parts*: to bench_branch_parts.py,
# profile*: to bench_step_profile.py)
declare -A limit=([eager]=90 [eager_triton]=90 [compiled]=200 [compiled_triton]=200 [reduce_overhead]=200
                  [reduce_overhead_triton]=200 [parts]=90 [parts_triton]=120 [inference]=60
                  [profile]=60 [profile_triton]=90 [profile_compiled]=150)
declare -A options=([eager]="" [eager_triton]="--triton" [compiled]="--compile default"
                    [compiled_triton]="--compile default --triton" [reduce_overhead]="--compile reduce-overhead"
                    [reduce_overhead_triton]="--compile reduce-overhead --triton" [parts]="" [parts_triton]="--triton"
                    [inference]="--reparameterize"
                    [profile]="" [profile_triton]="--triton" [profile_compiled]="--compile default")
for name in "${steps[@]}"; do
    if [ "$name" != kernels ] && [ -z "${limit[$name]+set}" ]; then
        echo "unknown step: $name (see the list at the top of $0)" >&2
        exit 2
    fi
done
mkdir -p "$out"
# the checkout first, then whatever the caller put on the path (packages carried to a machine that lacks them)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
cost="$python bench/bench_cost.py --device cuda --depths 18 --train-depths 18 --reps 21 --models-only"
parts="$python bench/bench_branch_parts.py --device cuda --reps 100"
profile="$python bench/bench_step_profile.py --device cuda"
# the kernel tests less the ahead-of-time compile test: on a GPU every kernel test compiles for the card itself
kernel_tests=($python -m pytest -q -p no:cacheprovider tests/test_dida_triton.py -k "not gpu_compiler")

failed=()
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    # written as <step>.txt.part and renamed when the step ends: a file still named .part was cut short by whatever
    # ended the whole script (the caller's own time limit)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt.part"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        local why=''
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why=': out of time, the output above is cut short'
        echo "## $name exited $rc$why" | tee -a "$out/$name.txt.part"
        failed+=("$name")
    fi
    mv "$out/$name.txt.part" "$out/$name.txt"
}

$python -c 'import torch, triton, timm; print("torch", torch.__version__, "triton", triton.__version__,
            "timm", timm.__version__, torch.cuda.get_device_name())' 2>&1 | tee "$out/versions.txt"
for name in "${steps[@]}"; do
    if [ "$name" = kernels ]; then
        step kernels 150 "${kernel_tests[@]}"
    elif [[ $name == parts* ]]; then
        step "$name" "${limit[$name]}" $parts ${options[$name]}
    elif [[ $name == profile* ]]; then
        step "$name" "${limit[$name]}" $profile ${options[$name]}
    else
        step "$name" "${limit[$name]}" $cost ${options[$name]}
    fi
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "failed steps: ${failed[*]}" >&2
    exit 1
fi
