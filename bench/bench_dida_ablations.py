"""Ablations of the DIDA module on one offline digits target (paper Tables IV-VI, docs/METHOD.md section 5).

Each variant changes one option of DIDA-Net's module in `dida_digitnet_compact` and is trained with the same
recipe, size and seeds as the accuracy study (bench/bench_uda_accuracy.py), so pointing both at the same --out
folder reuses the study's DIDA-Net, static-branch and FixMatch runs instead of training them again:

    single dilation (1 or 2), a 1x1 kernel on the dilation-1 path, unshared reduction convs,
    the channel reduction m in {2, 4, 8, 16, 32} (16 is DIDA-Net's), the static-kernel branch,
    and (ours, not the paper's) a learned scale on the branch output that starts near 0 (`layer_scale`);
    the released code's loss variant, pseudo-labelling source images too (`source_target_stream`),
    the branch and classifier at 10x the learning rate (`lr_10x`), a weaker strong view (`weak_augment`) and
    both (`lr_10x_weak_augment`); these recipe changes also without the branch (`no_branch_*`), since they change
    the baseline's recipe too;
    branch depth and placement (paper Table VII; the digit CNN's analogue of the ResNets' `branch_depth` and
    `dida_stages`): two DIDA units instead of one (`depth_2`), the branch beside conv2 instead of conv3
    (`block2`), beside both (`blocks_2_3`).

    python bench/bench_dida_ablations.py --jobs 2 --markdown dida_ablations.md   # ~15 min per seed on 2 CPU cores
    python bench/bench_dida_ablations.py --jobs 2 --variants no_branch static layer_scale
"""
import argparse
import sys
from pathlib import Path

import timm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import (  # noqa: E402
    METHODS, Study, emit_table, mean_std, offline_study, pseudo_label_cells, run_all, run_name, study_run)

import dida_timm  # noqa: E402,F401  registers the models
from dida_timm.arguments import at_least, check_options, distinct  # noqa: E402
from dida_timm.data.offline_digits import DOMAINS  # noqa: E402
from dida_timm.layers import is_branch_parameter  # noqa: E402

# recipe changes probed for DIDA-Net and plain FixMatch alike; the strong view's RandAugment magnitude 10 -> 5 and
# Cutout 16 -> 8 px
LR_10X = ('--new-lr-scale', '10')
WEAK_AUGMENT = ('--rand-augment', 'rand-m5-n2-mstd0.5', '--cutout', '8')

# id: (label, study method, module options, extra train.py arguments); the first three are the accuracy
# study's own runs
VARIANTS = {
    'dida': ('DIDA-Net (m 16, dilations 1 + 2, 3x3, shared reduction)', 'DIDA-Net', {}, ()),
    'static': ('static branch (learned depthwise kernels)', 'FixMatch + static branch', {}, ()),
    'no_branch': ('no branch (FixMatch)', 'FixMatch', {}, ()),
    'dilation_1': ('single dilation 1', 'DIDA-Net', {'dida_dilations': [1]}, ()),
    'dilation_2': ('single dilation 2', 'DIDA-Net', {'dida_dilations': [2]}, ()),
    'kernel_1x1': ('1x1 kernel on the dilation-1 path', 'DIDA-Net', {'dida_kernel_size': [1, 3]}, ()),
    'unshared': ('unshared reduction convs', 'DIDA-Net', {'dida_shared_reduction': False}, ()),
    'm2': ('m 2', 'DIDA-Net', {'dida_reduction': 2}, ()),
    'm4': ('m 4', 'DIDA-Net', {'dida_reduction': 4}, ()),
    'm8': ('m 8', 'DIDA-Net', {'dida_reduction': 8}, ()),
    'm32': ('m 32', 'DIDA-Net', {'dida_reduction': 32}, ()),
    'depth_2': ('two DIDA units in the branch (released-code style)', 'DIDA-Net', {'branch_depth': 2}, ()),
    'block2': ('branch beside conv2 instead of conv3', 'DIDA-Net', {'dida_blocks': [2]}, ()),
    'blocks_2_3': ('branches beside conv2 and conv3', 'DIDA-Net', {'dida_blocks': [2, 3]}, ()),
    # not a paper ablation: does DIDA-Net lag because its random branch slows early training? (docs/RESULTS.md)
    'layer_scale': ('branch output x learned scale, init 0.01 (ours)', 'DIDA-Net', {'dida_layer_scale': 0.01},
                    ()),
    'source_target_stream': ('unlabelled loss on source + target images (released code)', 'DIDA-Net', {},
                             ('--unlabelled-stream', 'source+target')),
    'no_branch_source_target_stream': ('no branch (FixMatch), unlabelled loss on source + target', 'FixMatch', {},
                                       ('--unlabelled-stream', 'source+target')),
    # the paper's learning-rate recipe for a pretrained backbone: new layers (branch, classifier) at 10x
    'lr_10x': ('branch + classifier at 10x the learning rate (paper, pretrained backbones)', 'DIDA-Net', {}, LR_10X),
    'no_branch_lr_10x': ('no branch (FixMatch), classifier at 10x the learning rate', 'FixMatch', {}, LR_10X),
    'weak_augment': ('weaker strong view (RandAugment m5, cutout 8)', 'DIDA-Net', {}, WEAK_AUGMENT),
    'no_branch_weak_augment': ('no branch (FixMatch), weaker strong view (RandAugment m5, cutout 8)', 'FixMatch', {},
                               WEAK_AUGMENT),
    'lr_10x_weak_augment': ('10x learning rate of new layers + weaker strong view', 'DIDA-Net', {},
                            LR_10X + WEAK_AUGMENT),
    'no_branch_lr_10x_weak_augment': ('no branch (FixMatch), 10x classifier learning rate + weaker strong view',
                                      'FixMatch', {}, LR_10X + WEAK_AUGMENT),
}


def branch_params(study: Study, method: str, options: dict) -> int:
    kwargs = {**METHODS[method][2], **options}
    model = timm.create_model(study.method_model(method), **kwargs)
    return sum(p.numel() for n, p in model.named_parameters() if is_branch_parameter(n))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--target', default='mnistm_style', choices=DOMAINS)
    parser.add_argument('--full', action='store_true', help='GPU size (as bench_uda_accuracy.py --full)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS,
                        help='DIDA-Net (dida) is always included: the differences are taken against it')
    parser.add_argument('--jobs', type=int, default=1, help='runs side by side (CPU threads are split)')
    parser.add_argument('--out', type=Path, default=None,
                        help="run folders (resumable; default: bench_uda_accuracy.py's for the size, whose DIDA-Net "
                             'runs are reused)')
    parser.add_argument('--markdown', type=Path, default=None, help='also write the table here')
    args = parser.parse_args()
    check_options(parser, args, [('seeds', at_least(0)), ('seeds', distinct), ('variants', distinct),
                                 ('jobs', at_least(1))])
    study = offline_study('full' if args.full else 'cpu')

    variants = ['dida'] + [v for v in args.variants if v != 'dida']
    names = {(v, seed): run_name(args.target, VARIANTS[v][1], VARIANTS[v][2], seed, VARIANTS[v][3])
             for seed in args.seeds for v in variants}
    runs = [study_run(study, names[v, seed], VARIANTS[v][1], args.target, seed, model_kwargs=VARIANTS[v][2],
                      train_args=VARIANTS[v][3]) for v, seed in names]
    results = run_all(runs, args.out or Path('output/uda_accuracy' + ('_full' if args.full else '')), args.jobs)

    def accs(variant):
        return [results[names[variant, seed]]['target_accuracy'] for seed in args.seeds]

    reference = accs('dida')
    lines = [
        f'DIDA ablations on `{study.model}`, target {args.target} (4 sources). {study.description}, seeds '
        f'{", ".join(map(str, args.seeds))}. Target accuracy (%), mean ± std; '
        'the difference to DIDA-Net is paired by seed; source-only start = accuracy after the source-only phase.',
        '',
        '| variant | branch params | source-only start | target accuracy | - DIDA-Net | kept (last epoch) '
        '| kept correct |',
        '|---|---|---|---|---|---|---|',
    ]
    for v in variants:
        label, method, options, _ = VARIANTS[v]
        c = pseudo_label_cells([results[names[v, seed]] for seed in args.seeds])
        lines.append(
            f"| {label} | {branch_params(study, method, options):,} | {c['start']} | {c['final']} "
            f"| {mean_std([a - b for a, b in zip(accs(v), reference)])} | {c['kept']} | {c['correct']} |")
    emit_table(lines, args.markdown)


if __name__ == '__main__':
    main()
