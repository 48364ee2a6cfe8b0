"""Does the training data pipeline keep memory flat over a long run with several loader workers?

Runs the training script's input pipeline (domain-balanced source batches + two-view target batches of the
offline benchmark, RandAugment + Cutout) with N workers for many epochs, without a model, and prints the
resident memory of the main process plus its workers (from /proc) as it goes.

    python bench/bench_loader_memory.py --workers 4 --epochs 40
"""
import argparse
import os
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from dida_timm.arguments import at_least, check_options
from dida_timm.data import (
    CyclingBatchSampler, DomainBalancedSampler, TransformedDataset, TwoViewDataset, create_domain_datasets,
    create_uda_transforms)
from dida_timm.training.run import describe_hardware


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def _tree_rss_mb(pid: int) -> float:
    children = Path(f'/proc/{pid}/task/{pid}/children')
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    return _rss_mb(pid) + sum(_tree_rss_mb(k) for k in kids)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--epochs', type=int, default=40)
    parser.add_argument('--batch-size', type=int, default=32)
    args = parser.parse_args()
    check_options(parser, args, [('workers', at_least(0)), ('epochs', at_least(1)), ('batch_size', at_least(1))])
    domains = ['mnist', 'syn_style', 'svhn_style', 'uci_digits']
    sources = create_domain_datasets('offline_digits', None, domains, 'train')
    target, = create_domain_datasets('offline_digits', None, ['mnistm_style'], 'train')
    tf = create_uda_transforms(32, (0.5,) * 3, (0.5,) * 3, flip=False, translate=0)
    source_ds = ConcatDataset([TransformedDataset(d, tf['weak']) for d in sources])
    target_ds = TwoViewDataset(target, tf['weak'], tf['strong'])
    source_sampler = DomainBalancedSampler([len(d) for d in sources], args.batch_size)
    target_sampler = CyclingBatchSampler(len(target), args.batch_size, len(source_sampler))
    pid = os.getpid()
    print(f'# loader memory, {args.workers} workers, {len(source_sampler)} steps per epoch, batch '
          f'{len(domains)} x {args.batch_size} + {args.batch_size} (two views); '
          f'{describe_hardware(torch.device("cpu"))}, torch {torch.__version__}\n')
    print('| epoch | steps | RSS main + workers (MB) | max during epoch (MB) | s / epoch |')
    print('|---|---|---|---|---|')
    steps, first = 0, None
    for epoch in range(args.epochs):
        source_sampler.set_epoch(epoch)
        target_sampler.set_epoch(epoch)
        loaders = [DataLoader(source_ds, batch_sampler=source_sampler, num_workers=args.workers),
                   DataLoader(target_ds, batch_sampler=target_sampler, num_workers=args.workers)]
        start, peak = time.time(), 0.0
        for i, _ in enumerate(zip(*loaders)):
            steps += 1
            if i % 10 == 0:
                peak = max(peak, _tree_rss_mb(pid))
        del loaders
        rss = _tree_rss_mb(pid)
        first = first or peak
        if epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs - 1:
            print(f'| {epoch + 1} | {steps} | {rss:.0f} | {peak:.0f} | {time.time() - start:.1f} |', flush=True)
    print(f'\npeak RSS (main + workers) in the last epoch / in the first: {peak / first:.3f}')


if __name__ == '__main__':
    main()
