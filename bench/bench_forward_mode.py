"""Which FixMatch step and strong view should be the default: one joint pass or the released code's separate
passes, pseudo-labels with or without dropout, timm's RandAugment or FixMatch's?

DIDA-Net's released code (Dassl) computes pseudo-labels in a no-grad pass over the weak views in training mode
(dropout active), then runs the supervised and the strong passes separately; the original FixMatch runs every
view in one pass (one set of batch statistics). Its strong view is its own RandAugment (14 ops, each always
applied at a magnitude drawn uniformly) and a Cutout square placed anywhere, where the README recipe uses timm's
`rand-m10-n2-mstd0.5` (ops applied with p=0.5 at a magnitude near 10). Four steps are compared:

    joint                  source + weak + strong target in one pass (`--forward-mode joint`, dropout on the weak
                           view too: it shares the pass), timm's RandAugment (the README recipe)
    separate               the released code's three passes (`--forward-mode separate`)
    separate, no dropout   the same, the pseudo-label pass without dropout (`--no-pseudo-label-dropout`;
                           batch normalisation still in training mode)
    joint, FixMatch view   one pass, FixMatch's RandAugment and Cutout (`--rand-augment fixmatch`)

Leave one domain out on the built-in offline benchmark, every domain as the target, 3 seeds, FixMatch
(`digitnet_compact`) and DIDA-Net (`dida_digitnet_compact`), the README recipe at the CPU size of the other
studies (1,000 train images per domain, 12 FixMatch epochs). Every adapting run of a (target, seed) starts from
ONE static source-only run (3 epochs), DIDA-Net with a fresh branch on it, so the steps are compared from the
same start and differences are paired. Under the tables: the verdict of the decision rule (a step replaces
`joint` only if better by more than 2 standard errors over both methods), and what the default selection
(`--select guarded_last`) would have shipped, replayed on each run's per-epoch history. Runs are seed-major and
resumable: a stopped study keeps whole seeds, re-running the command continues it, and `--analyse-only` tables
whatever has finished.

    python bench/bench_forward_mode.py --jobs 2 --markdown forward_mode.md
    python bench/bench_forward_mode.py --analyse-only
"""
import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import (  # noqa: E402
    emit_table, finished_results, mean_pseudo_accuracy, mean_std, offline_study, pick, run_all, run_name,
    shared_start_run, study_run)

from dida_timm.arguments import at_least, check_options, distinct  # noqa: E402
from dida_timm.data.offline_digits import DOMAINS  # noqa: E402
from dida_timm.training.selection import CollapseGuard  # noqa: E402

METHODS = ('FixMatch', 'DIDA-Net')
STEPS: Dict[str, Tuple[str, ...]] = {
    'joint': ('--forward-mode', 'joint'),
    'separate': ('--forward-mode', 'separate'),
    'separate, no dropout': ('--forward-mode', 'separate', '--no-pseudo-label-dropout'),
    'joint, FixMatch view': ('--forward-mode', 'joint', '--rand-augment', 'fixmatch'),
}
BASELINE = 'joint'


def table(grid: Dict[Tuple[int, str, str, str], str], starts: Dict[Tuple[int, str], str],
          results: Dict[str, dict], targets: List[str], steps: List[str]) -> List[str]:
    """Markdown tables of `steps` over the seeds whose every run has finished, and the decision rule's verdict."""
    grid = {key: name for key, name in grid.items() if key[3] in steps}
    seeds = sorted({s for s, *_ in grid})
    seeds = [s for s in seeds if all(n in results for (seed, *_), n in grid.items() if seed == s)
             and all(n in results for (seed, _), n in starts.items() if seed == s)]
    if not seeds:
        return ['No seed has finished every run yet.']

    def acc(seed, target, method, step):
        return results[grid[seed, target, method, step]]['target_accuracy']

    columns = [(m, s) for m in METHODS for s in steps]
    lines = [
        f'Target test accuracy (%) of the last epoch, mean ± std over seeds {", ".join(map(str, seeds))}; '
        'start: the shared static source-only run.',
        '',
        '| target | start | ' + ' | '.join(f'{m}: {s}' for m, s in columns) + ' |',
        '|---|---|' + '---|' * len(columns),
    ]
    for target in targets:
        start = mean_std([results[starts[seed, target]]['target_accuracy'] for seed in seeds])
        cells = [mean_std([acc(seed, target, m, s) for seed in seeds]) for m, s in columns]
        lines.append(f'| {target} | {start} | ' + ' | '.join(cells) + ' |')
    # the average's std is over seeds of the per-seed mean over targets
    start = mean_std([statistics.mean(results[starts[seed, t]]['target_accuracy'] for t in targets) for seed in seeds])
    cells = [mean_std([statistics.mean(acc(seed, t, m, s) for t in targets) for seed in seeds]) for m, s in columns]
    lines.append(f'| **average** | {start} | ' + ' | '.join(cells) + ' |')

    lines += [
        '',
        f'Paired with `{BASELINE}` over the {len(seeds) * len(targets)} (target, seed) pairs: mean difference '
        '(points), pairs better / worse, and in the last epoch the kept share of target pseudo-labels and how many '
        'of them were right (means); seconds per FixMatch epoch on this machine (median over the run\'s epochs, so '
        'a paused or crowded epoch does not count).',
        '',
        f'| method | step | minus {BASELINE} | better / worse | kept | kept correct | s per epoch |',
        '|---|---|---|---|---|---|---|',
    ]
    pairs = [(seed, t) for seed in seeds for t in targets]
    for m, s in columns:
        runs = [results[grid[seed, t, m, s]] for seed, t in pairs]
        last = [[h for h in r['history'] if h['phase'] == 'fixmatch'][-1] for r in runs]
        diff = [acc(seed, t, m, s) - acc(seed, t, m, BASELINE) for seed, t in pairs]
        versus = '- | -' if s == BASELINE else (f'{statistics.mean(diff):+.1f} ± {statistics.stdev(diff):.1f} | '
                                                f'{sum(d > 0 for d in diff)} / {sum(d < 0 for d in diff)}')
        lines.append(
            f'| {m} | {s} | {versus} | '
            f'{statistics.mean(h["keep_rate"] for h in last):.0%} | '
            f'{mean_pseudo_accuracy(last)} | '
            f'{statistics.median(h["epoch_seconds"] for r in runs for h in r["history"] if h["phase"] == "fixmatch"):.0f} |')

    lines += ['', f'The rule (fixed before the last seed ran): a step replaces `{BASELINE}` as the default only if its '
                  f'mean paired difference over both methods ({len(pairs) * len(METHODS)} pairs) is positive and '
                  f'above 2 standard errors.', '', f'| step | minus {BASELINE}, both methods | standard error | '
                  'verdict |', '|---|---|---|---|']
    adopted = []
    for s in steps:
        if s == BASELINE:
            continue
        diff = [acc(seed, t, m, s) - acc(seed, t, m, BASELINE) for seed, t in pairs for m in METHODS]
        mean, error = statistics.mean(diff), statistics.stdev(diff) / len(diff) ** 0.5
        better = mean > 2 * error
        if better:
            adopted.append((mean, s))
        lines.append(f'| {s} | {mean:+.1f} | {error:.1f} | {"better" if better else "not shown better"} |')
    lines += ['', f'Default: `{max(adopted)[1] if adopted else BASELINE}`.', '']

    # what a user of the defaults gets: the runs kept the last epoch (--select last), their histories replay the rule
    shipped = {key: pick(results[name], 'guarded_last', CollapseGuard())[0]['target_accuracy']
               for key, name in grid.items() if key[0] in seeds}
    lines += ['What `--select guarded_last` (the default, its guard as shipped) would have shipped from the same runs, '
              'replayed on their per-epoch histories: target test accuracy (%), mean ± std over seeds.', '',
              '| target | ' + ' | '.join(f'{m}: {s}' for m, s in columns) + ' |', '|---|' + '---|' * len(columns)]
    for target in targets:
        lines.append(f'| {target} | ' + ' | '.join(
            mean_std([shipped[seed, target, m, s] for seed in seeds]) for m, s in columns) + ' |')
    lines.append('| **average** | ' + ' | '.join(
        mean_std([statistics.mean(shipped[seed, t, m, s] for t in targets) for seed in seeds]) for m, s in columns)
        + ' |')
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--targets', nargs='+', default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument('--jobs', type=int, default=1, help='runs side by side (CPU threads are split)')
    parser.add_argument('--out', type=Path, default=Path('output/forward_mode'), help='run folders (resumable)')
    parser.add_argument('--markdown', type=Path, default=None, help='also write the tables here')
    parser.add_argument('--steps', nargs='+', default=list(STEPS), choices=list(STEPS),
                        help=f'steps to run and table ({BASELINE!r} always included: the others are paired with it)')
    parser.add_argument('--analyse-only', action='store_true', help='table the finished runs, train nothing')
    args = parser.parse_args()
    check_options(parser, args, [('seeds', at_least(0)), ('seeds', distinct), ('targets', distinct),
                                 ('steps', distinct), ('jobs', at_least(1))])
    steps = [BASELINE] + [s for s in args.steps if s != BASELINE]
    study = offline_study('cpu')
    starts = {(seed, t): run_name(t, 'shared start', {}, seed) for seed in args.seeds for t in args.targets}
    grid = {(seed, t, m, s): run_name(t, m, {}, seed, STEPS[s], shared_start=True)
            for seed in args.seeds for t in args.targets for m in METHODS for s in steps}
    if not args.analyse_only:
        run_all([shared_start_run(study, name, t, seed) for (seed, t), name in starts.items()], args.out, args.jobs)
        run_all([study_run(study, name, m, t, seed, train_args=STEPS[s],
                           start=args.out / starts[seed, t] / 'model.safetensors')
                 for (seed, t, m, s), name in grid.items()], args.out, args.jobs)
    results = finished_results(args.out, [*starts.values(), *grid.values()])
    emit_table([f'{study.description}, leave one domain out, `{study.model}` (DIDA-Net) and its static twin '
                '(FixMatch), every adapting run from one shared static start per target and seed.', '',
                *table(grid, starts, results, args.targets, steps)], args.markdown)


if __name__ == '__main__':
    main()
