"""Does DIDA-Net beat its baselines? Leave-one-domain-out, several seeds, four methods with one recipe.

The comparison of the paper's Table IV (PACS: FixMatch 88.86, static-CNN branch 90.39, DIDA-Net 91.83). By
default it runs on the built-in offline benchmark: every domain in turn is the target and the other four are the
labelled sources, with the README recipe (train/configs/offline_digits_cpu.yaml: SGD 0.05, cosine, 4 x 32 source
+ 32 target images per step, RandAugment + Cutout on the strong view, threshold 0.95):

    source-only               digitnet_compact (static twin), source images only, as many epochs in total
    FixMatch                  digitnet_compact, source-only phase then FixMatch
    FixMatch + static branch  dida_digitnet_compact with dida_dynamic=False (a learned static kernel, ~ same size)
    DIDA-Net                  dida_digitnet_compact

Sizes: `cpu` (default) 1,000 train images per domain (10% of each source and 20% of the target held out for
the label-free scores), 3 source-only + 12 FixMatch epochs (28 steps each); 5 targets x 3 seeds x 4 methods took
83 minutes on 2 CPU cores with `--jobs 2` before the per-epoch label-free scoring, about 3 hours with it (5-15
min per run on a shared 2-core machine, 2026-12-02): `--records` lets it continue in another session or on
another machine; `--full` 2,000 images, 5 + 20 epochs (the README main job's recipe), for a GPU. Test: 500
images per domain. Runs are resumable: re-running the command skips finished runs and continues interrupted ones.

With the data of a published setting, `--config` runs the same study on it: its domains (sources + target),
its recipe and its model (DIDA-Net; FixMatch and source-only use the static twin, e.g. dida_resnet18.tv_in1k ->
resnet18.tv_in1k, with the same pretrained weights).

    python bench/bench_uda_accuracy.py --jobs 2 --markdown uda_accuracy.md --records uda_accuracy.csv
    python bench/bench_uda_accuracy.py --full --out output/uda_accuracy_full
    python bench/bench_uda_accuracy.py --jobs 2 --train-args '--new-lr-scale 10'   # a recipe change, every method
    python bench/bench_uda_accuracy.py --jobs 2 --branch-kwargs '{dida_blocks: [2]}'  # both branches moved
    python bench/bench_uda_accuracy.py --jobs 2 --shared-start  # one static source-only start, branch added after
    python bench/bench_uda_accuracy.py --config train/configs/pacs.yaml --data-dir /data/pacs  # paper Table IV
"""
import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from dida_timm.arguments import at_least, check_options, distinct, yaml_value

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import (  # noqa: E402
    METHODS, emit_table, finished_results, mean_std, offline_study, published_study, pseudo_label_cells,
    restore_records, run_all, run_name, shared_start_run, study_run, write_records)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--full', action='store_true', help='GPU size (2,000 images per domain, 5 + 20 epochs)')
    parser.add_argument('--config', type=Path, default=None,
                        help='a published setting (train/configs/*.yaml) instead of the offline benchmark')
    parser.add_argument('--data-dir', type=Path, default=None, help='dataset root of --config')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--targets', nargs='+', default=None, help='default: every domain of the study')
    parser.add_argument('--jobs', type=int, default=1, help='runs side by side (CPU threads are split)')
    parser.add_argument('--out', type=Path, default=None,
                        help='run folders (resumable); default output/uda_accuracy[_<config name>]')
    parser.add_argument('--markdown', type=Path, default=None, help='also write the tables here')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS,
                        help='methods to run (DIDA-Net is always included: the differences are taken against it)')
    parser.add_argument('--train-args', type=shlex.split, default=[],
                        help='extra train.py arguments for every run, one quoted string (run names record them)')
    parser.add_argument('--shared-start', action='store_true',
                        help='the adapting methods of a (target, seed) all start from one static source-only run, '
                             'the branch models with a fresh branch (run names record it)')
    parser.add_argument('--branch-kwargs', type=yaml_value, default={},
                        help='model options (YAML) for the two methods with a branch, e.g. a placement ablation; '
                             'run names record them')
    parser.add_argument('--records', type=Path, default=None,
                        help='CSV of one row per finished run: the runs it holds that --out has not finished are '
                             'taken from it (a study continued on another machine), and it is rewritten at the end')
    parser.add_argument('--records-only', action='store_true',
                        help='write --records from the runs finished so far and stop (run nothing)')
    args = parser.parse_args()
    if args.records_only and args.records is None:
        parser.error('--records-only needs --records')
    check_options(parser, args, [('seeds', at_least(0)), ('seeds', distinct), ('targets', distinct),
                                 ('jobs', at_least(1)), ('methods', distinct)])
    if not isinstance(args.branch_kwargs, dict):
        parser.error(f'--branch-kwargs must be a mapping, got {args.branch_kwargs!r}')
    if (args.config is None) != (args.data_dir is None):
        parser.error('--config and --data-dir go together')
    if args.config is not None and args.full:
        parser.error('--full sizes the offline benchmark; a --config study uses the config\'s recipe')
    try:
        study = published_study(args.config, args.data_dir) if args.config else offline_study(
            'full' if args.full else 'cpu')
    except (OSError, ValueError) as e:
        parser.error(str(e))
    targets = args.targets or list(study.domains)
    unknown = [t for t in targets if t not in study.domains]
    if unknown:
        parser.error(f'--targets {unknown} are not domains of the study {list(study.domains)}')
    if args.shared_start and not study.source_only_epochs:
        parser.error('--shared-start needs a study with a source-only phase to share')
    # one folder per size: finished runs are reused by name, and a cpu-size run must not stand in for a --full one
    out = args.out or Path('output') / ('uda_accuracy' + ('_full' if args.full else '')
                                        + (f'_{args.config.stem}' if args.config else ''))
    recipe = tuple(args.train_args)
    methods = [m for m in METHODS if m in args.methods or m == 'DIDA-Net']
    # the baselines DIDA-Net is compared with, by column label
    bases = {label: m for label, m in (('FixMatch', 'FixMatch'), ('static branch', 'FixMatch + static branch'))
             if m in methods}

    # seed-major, so a study stopped early still has whole seeds
    def options(method):
        return args.branch_kwargs if METHODS[method][0] else {}

    def shared(method):
        return args.shared_start and METHODS[method][1] != 'source_only'

    grid = {(seed, target, method): run_name(target, method, options(method), seed, recipe, shared(method))
            for seed in args.seeds for target in targets for method in methods}
    starts = {}
    if args.shared_start:
        starts = {(seed, target): run_name(target, 'shared start', {}, seed, recipe)
                  for seed in args.seeds for target in targets}
    names = [*starts.values(), *grid.values()]
    if args.records is not None and args.records.is_file():
        restored = restore_records(args.records, out, names)
        print(f'{len(restored)} finished runs taken from {args.records}', flush=True)
    if args.records_only:
        finished = finished_results(out, names)
        write_records(args.records, finished)
        print(f'{len(finished)} of {len(names)} runs finished; their records are in {args.records}')
        return
    if args.shared_start:
        start_results = run_all([shared_start_run(study, name, target, seed, recipe)
                                 for (seed, target), name in starts.items()], out, args.jobs)
    runs = [study_run(study, name, method, target, seed, model_kwargs=options(method), train_args=recipe,
                      start=out / starts[seed, target] / 'model.safetensors' if shared(method) else None)
            for (seed, target, method), name in grid.items()]
    results = run_all(runs, out, args.jobs)
    for (seed, target, method), name in grid.items():
        if shared(method):  # the start is the shared run's final accuracy
            results[name]['source_only_start_target_accuracy'] = start_results[starts[seed, target]][
                'target_accuracy']

    def acc(seed, target, method):
        return results[grid[seed, target, method]]['target_accuracy']

    lines = [
        f'{study.description}, leave one domain out, `{study.model}` and its static twin, seeds '
        f'{", ".join(map(str, args.seeds))}{"; every run with " + shlex.join(recipe) if recipe else ""}'
        f'{"; both branches with " + json.dumps(args.branch_kwargs) if args.branch_kwargs else ""}'
        f'{"; every adapting method starts from one static source-only run per target and seed" * args.shared_start}. '
        'Target test accuracy (%), mean ± std over seeds.',
        '',
        '| target | ' + ' | '.join(methods) + ''.join(f' | DIDA-Net - {b}' for b in bases) + ' |',
        '|---|' + '---|' * (len(methods) + len(bases)),
    ]

    def row(label, value):
        cells = [mean_std([value(seed, m) for seed in args.seeds]) for m in methods]
        gains = [mean_std([value(seed, 'DIDA-Net') - value(seed, base) for seed in args.seeds])
                 for base in bases.values()]
        return f'| {label} | ' + ' | '.join(cells + gains) + ' |'

    for target in targets:
        lines.append(row(target, lambda seed, m, t=target: acc(seed, t, m)))
    # the average's std is over seeds of the per-seed mean over targets
    lines.append(row('**average**', lambda seed, m: statistics.mean(acc(seed, t, m) for t in targets)))

    lines += [
        '',
        'Pseudo-label diagnostics of the adapting runs (mean over seeds): accuracy at the end of the source-only '
        'phase, and in the last FixMatch epoch the share of target images kept (confidence >= 0.95) and how many '
        'of the kept pseudo-labels were right.',
        '',
        '| target | method | source-only start | final accuracy | kept | kept pseudo-labels correct |',
        '|---|---|---|---|---|---|',
    ]
    for target in targets:
        for method in [m for m in methods if METHODS[m][1] == 'fixmatch']:
            c = pseudo_label_cells([results[grid[seed, target, method]] for seed in args.seeds])
            lines.append(f"| {target} | {method} | {c['start']} | {c['final']} | {c['kept']} | {c['correct']} |")
    if args.records is not None:
        write_records(args.records, {**results, **(start_results if args.shared_start else {})})
    wall = sum(r['wall_seconds'] for r in results.values())
    lines += ['', f'Training time summed over the {len(runs)} runs: {wall / 60:.0f} min.']
    emit_table(lines, args.markdown)


if __name__ == '__main__':
    main()
