#!/usr/bin/env python3
"""Adapt a timm classifier to an unlabelled target domain: DIDA-Net's recipe (FixMatch + DIDA branch).

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028 (docs/METHOD.md section 3).

    python train/train.py -c train/configs/offline_digits_cpu.yaml            # the README's main job
    python train/train.py --model dida_resnet18.tv_in1k --pretrained --dataset pacs --data-dir /data/pacs \\
        --source art_painting cartoon photo --target sketch -c train/configs/pacs.yaml
    torchrun --nproc_per_node 2 train/train.py -c ...                        # DDP, gloo on CPU / nccl on GPU

`--model resnet18` gives the FixMatch baseline, `--model dida_resnet18` DIDA-Net, `--method source_only`
the source-only baseline. With `--source-only-epochs N` the run first trains on the source alone (that model
is the source-only starting point, evaluated and reported) and then adapts it; `--init-checkpoint` starts from
given weights instead, e.g. DIDA-Net from a trained static twin with a fresh branch. Batch sizes are per process
and per domain: a step sees K x B source images and B target images on every rank.

Writes to --output/<experiment>: args.yaml, log.txt, summary.csv, checkpoints/, model.safetensors,
results.json and the report pictures (confusion matrix, t-SNE, curves).
"""
import sys

from dida_timm.training.run import main

if __name__ == '__main__':
    sys.exit(main())
