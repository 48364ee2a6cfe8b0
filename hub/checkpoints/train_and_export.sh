#!/usr/bin/env bash
# Reproduces the published offline_digits checkpoints: for each domain as the target, the README's main job
# (train/configs/offline_digits_cpu.yaml) with the other four domains as sources, then the export.
# About 3-30 minutes per target on 2 CPU cores (2.3-6.5 idle; machines and load differ).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
domains=(mnist mnistm_style syn_style svhn_style uci_digits)
for target in "${domains[@]}"; do
    sources=()
    for d in "${domains[@]}"; do [ "$d" != "$target" ] && sources+=("$d"); done
    "$PYTHON" train/train.py -c train/configs/offline_digits_cpu.yaml --source "${sources[@]}" --target "$target" \
        --output output/published --experiment "offline_$target" --no-progress
    "$PYTHON" hub/export.py "output/published/offline_$target" \
        --out "hub/checkpoints/dida_digitnet_compact.offline_$target" \
        --repo-name "dida-timm/dida_digitnet_compact.offline_$target"
done
