"""What the DIDA branch costs beside timm CNNs: each registered `dida_<base>` against timm's `<base>`.

Prints, measured side by side in one run on this machine, one row per model: parameters, MACs (torch's
FlopCounterMode, 224 px), the forward latency ratio DIDA / plain (eval, batch 32, 224 px) and the training-step
time ratio (forward + backward + SGD step, batch 16, 224 px), then what the branch's MACs are made of.
Timings alternate the two models and report the ratio of the medians with the quartiles of the per-round
ratios in brackets (bench_cost.py's method).

    python bench/bench_generic_cost.py                          # the five models of docs/RESULTS.md
    python bench/bench_generic_cost.py --models convnext_atto regnety_004 --reps 3
"""
import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dida_timm  # noqa: F401  registers the models
from dida_timm.arguments import at_least, between, check_options
from dida_timm.layers import DidaModule, DidaStage
from dida_timm.training.run import describe_hardware

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cost import (  # noqa: E402
    count_macs, forward_fn, paired_times, ratio_with_spread, registered_bases, train_step_fn)

MODELS = ['convnext_tiny', 'regnety_016', 'resnet50d', 'efficientnet_b0', 'mobilenetv3_large_100']


def branch_macs(model: torch.nn.Module, img_size: int) -> Dict[str, int]:
    """MACs of the branch's DIDA modules by layer: 1x1 reduction, dynamic depthwise conv (with the kernel
    generator), 1x1 fuse; `other` is what lies outside the modules (projection convs; norms are not counted)."""
    inputs = {}
    stages = [m for m in model.modules() if isinstance(m, DidaStage)]
    hooks = [s.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0])) for s in stages]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    kinds = dict.fromkeys(('reduce', 'depthwise', 'fuse', 'other'), 0)
    for stage in stages:
        shapes = {}
        units = [m for m in stage.branch.modules() if isinstance(m, DidaModule)]
        unit_hooks = [u.register_forward_hook(lambda m, a, out: shapes.__setitem__(m, (a[0].shape, out.shape)))
                      for u in units]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            stage.branch(inputs[stage])
        for h in unit_hooks:
            h.remove()
        # counts of a module include its children's
        per_module = {name: sum(c.values()) // 2 for name, c in counter.get_flop_counts().items()}
        total = counter.get_total_flops() // 2
        dida = sum(v for n, v in per_module.items() if n.endswith('.dida'))
        # the unit runs its 1x1s as functions of the conv weights (batched matmuls on CPU), not as its `conv` and
        # `fuse` submodules, so their MACs are counted from the shapes: input pixels x C x r, output pixels x r x P
        reduce = sum(inp.numel() * u.reduced_chs for u, (inp, _) in shapes.items())
        fuse = sum(out.numel() * u.reduced_chs for u, (_, out) in shapes.items())
        kinds['reduce'] += reduce
        kinds['fuse'] += fuse
        kinds['depthwise'] += dida - reduce - fuse
        kinds['other'] += total - dida
    return kinds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=MODELS, help='timm base models with a registered dida_ twin')
    parser.add_argument('--reps', type=int, default=5, help='timed rounds (at least 2: ratios carry their quartiles)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--forward-batch', type=int, default=32)
    parser.add_argument('--train-batch', type=int, default=16, help='at most --forward-batch (its first images)')
    args = parser.parse_args()
    check_options(parser, args, [('models', registered_bases), ('reps', at_least(2)), ('img_size', at_least(32)),
                                 ('forward_batch', at_least(2)), ('train_batch', between(2, args.forward_batch))])
    torch.manual_seed(0)
    print(f'# DIDA beside timm CNNs, {describe_hardware(torch.device("cpu"))}, torch {torch.__version__}, '
          f'timm {timm.__version__}, eager\n')
    print('| model vs plain timm | params | MACs | extra params | extra MACs | fwd latency ratio (b'
          f'{args.forward_batch}) | train-step ratio (b{args.train_batch}) | branch MACs: 1x1 reduce / dynamic '
          'depthwise / 1x1 fuse / other |')
    print('|---|---|---|---|---|---|---|---|')
    size = args.img_size
    for base in args.models:
        static, dida = timm.create_model(base), timm.create_model(f'dida_{base}')
        p_s, p_d = (sum(p.numel() for p in m.parameters()) for m in (static, dida))
        m_s, m_d = (count_macs(m, (1, 3, size, size)) for m in (static, dida))
        kinds = branch_macs(dida, size)
        x = torch.randn(args.forward_batch, 3, size, size)
        fwd = paired_times({'static': forward_fn(static, x), 'dida': forward_fn(dida, x)}, args.reps, 1)
        xt = x[:args.train_batch]
        y = torch.randint(0, static.num_classes, (args.train_batch,))
        train = paired_times({'static': train_step_fn(static, xt, y), 'dida': train_step_fn(dida, xt, y)},
                             args.reps, 1)
        print(f'| dida_{base} vs {base} | {p_d / 1e6:.2f}M vs {p_s / 1e6:.2f}M | {m_d / 1e6:.1f}M vs '
              f'{m_s / 1e6:.1f}M | +{(p_d - p_s) / p_s:.2%} | +{(m_d - m_s) / m_s:.2%} | {ratio_with_spread(fwd)} '
              f'({statistics.median(fwd["static"]) * 1e3:.0f} ms plain) | {ratio_with_spread(train)} | '
              + ' / '.join(f'{v / 1e6:.2f}M' for v in kinds.values()) + ' |', flush=True)


if __name__ == '__main__':
    main()
