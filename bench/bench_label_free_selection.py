"""Label-free checkpoint selection: which epoch to ship when the target has no labels, judged where labels exist.

Leave one domain out on the built-in offline benchmark, every domain as the target, 3 seeds, FixMatch
(`digitnet_compact`) and DIDA-Net (`dida_digitnet_compact`), the README recipe at the CPU size of the other
studies (1,000 train images per domain, 3 source-only + 12 FixMatch epochs; `--size full`: 2,000 images and
5 + 20 epochs, the README main job itself, about 3x longer). Each run logs the label-free scores of every epoch (held-out target and
source slices, never trained on) next to the true target test accuracy, and keeps every epoch's checkpoint, so
that any rule can be replayed on the histories and the rule's pick re-exported. The analysis:

- per run: the source-only start, the last epoch, the rule's pick, the oracle (best epoch by target labels), the
  label-free estimate of the pick and whether the collapse guard fired -> docs/results/label_free_selection.csv;
- the mean of last / selected / oracle, how often the pick is > 2 points below the source-only start;
- the Spearman correlation of each score with the true accuracy over the epochs of each run;
- the mean absolute error of the accuracy estimate on the picked checkpoints, and of other label-free estimates
  (ATC with either score, average confidence, DoC, COT) recomputed from the saved probabilities;
- the guard's thresholds fitted leave one target out: fitted on four targets' runs, graded on the fifth.

    python bench/bench_label_free_selection.py --jobs 2        # the 30 runs (resumable), then the tables
    python bench/bench_label_free_selection.py --analyse-only --csv docs/results/label_free_selection.csv
"""
import argparse
import csv
import itertools
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import (  # noqa: E402
    SIZES, candidates, emit_table, finished_results, offline_study, pick, run_all, run_name, study_run)

from dida_timm.arguments import at_least, check_options, distinct  # noqa: E402
from dida_timm.data.offline_digits import DOMAINS  # noqa: E402
from dida_timm.training.selection import (  # noqa: E402
    LABEL_FREE_KEYS, RULES, CollapseGuard, atc_estimate, cot_estimate, fit_atc_threshold, fit_atc_tie_share,
    fit_temperature)

METHODS = ('FixMatch', 'DIDA-Net')
# every epoch's checkpoint stays, so the pick of any rule can be exported afterwards
KEEP_ALL = ('--keep-checkpoints', '100')


def study_grid(targets, seeds):
    """{(seed, target, method): run name} of the study, seed-major so a study stopped early has whole seeds."""
    return {(seed, target, method): run_name(target, method, {}, seed, KEEP_ALL)
            for seed in seeds for target in targets for method in METHODS}


# the guard settings the leave-one-target-out fit chooses from, strictest first: among settings that pick equally
# well on the fitting runs the strictest wins, since those runs hold few collapses to learn the guard from
GUARD_GRID = [
    CollapseGuard(ratio, dead, agreement)
    for ratio, dead, agreement in itertools.product(
        (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.0), (0, 1, 2, 3, 10), (70.0, 60.0, 50.0, 40.0, 30.0, 0.0))
]
GUARDED_RULES = [r for r, (guarded, _) in RULES.items() if guarded]
# a pick more than this many points below the source-only start counts as harm
HARM_MARGIN = 2.0


def outcome(runs: Sequence[dict], rule: str, guard: CollapseGuard) -> Tuple[int, float]:
    """(-harmful picks, mean picked accuracy): larger is better, harm first."""
    picked = [(pick(r, rule, guard)[0]['target_accuracy'], candidates(r)[0]['target_accuracy']) for r in runs]
    return -sum(acc < start - HARM_MARGIN for acc, start in picked), statistics.mean(acc for acc, _ in picked)


def fit_rule(runs: Sequence[dict]) -> Tuple[str, CollapseGuard]:
    """The guarded rule and guard settings with the fewest harmful picks, then the best mean, on `runs` (ties:
    the strictest guard)."""
    best, best_score = None, None
    for rule in GUARDED_RULES:
        for guard in GUARD_GRID:
            score = outcome(runs, rule, guard)
            if best_score is None or score > best_score:
                best, best_score = (rule, guard), score
    return best


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float('nan')
    return float(spearmanr(x, y).statistic)


def estimates(run_dir: Path, epoch: int) -> Dict[str, float]:
    """Label-free accuracy estimates of one epoch recomputed from its saved probabilities: ATC with either
    confidence score, the average confidence (AC), the difference of confidences (DoC: source accuracy minus
    the drop in mean confidence), and COT on the raw and on the temperature-scaled predictions (what runs report
    since 2026-12-02)."""
    dump = np.load(run_dir / 'label_free' / f'epoch-{epoch:04d}.npz')
    # as stored: float64 since 2026-12-05 (float32, float16 before), where converting would round confident ones
    target = torch.from_numpy(dump['target_probs']).double()
    source = torch.from_numpy(dump['source_probs']).double()
    labels = torch.from_numpy(dump['source_labels'])
    out = {}
    for score in ('max_prob', 'neg_entropy'):
        threshold = fit_atc_threshold(source, labels, score)
        out[f'ATC ({score})'] = atc_estimate(target, threshold, score,
                                             fit_atc_tie_share(source, labels, threshold, score))
    out['AC'] = float(target.max(-1).values.mean() * 100)
    source_acc = float((source.argmax(-1) == labels).float().mean() * 100)
    drop = float(source.max(-1).values.mean() - target.max(-1).values.mean()) * 100
    out['DoC'] = source_acc - drop
    share = torch.bincount(labels, minlength=target.shape[1]).double()
    out['COT'] = cot_estimate(target, share)
    out['COT (temperature-scaled)'] = cot_estimate(target, share, fit_temperature(source, labels))
    return out


def slice_accuracy(run_dir: Path, epoch: int) -> float:
    """Accuracy of one epoch on the held-out target slice the estimates read, by that slice's labels: what an
    estimator computed on the slice aims at, so its distance to the test accuracy bounds how close any can get."""
    dump = np.load(run_dir / 'label_free' / f'epoch-{epoch:04d}.npz')
    return float((dump['target_probs'].argmax(-1) == dump['target_labels']).mean() * 100)


def estimate_columns(rows: Sequence[dict]) -> Dict[str, str]:
    """{label: row key} of the estimates of the picks, and of the held-out slice's labelled accuracy."""
    columns = {k.removeprefix('estimated_'): k for k in rows[0] if k.startswith('estimated_')}
    columns['(not label-free) accuracy on the held-out target slice'] = 'target_slice_accuracy'
    return columns


def estimate_error_lines(rows: Sequence[dict], columns: Dict[str, str]) -> List[str]:
    """Table rows: each estimate's mean absolute, mean signed and largest error against the pick's true accuracy."""
    lines = []
    for label, key in columns.items():
        errors = [r[key] - r['selected'] for r in rows]
        lines.append(f"| {label} | {statistics.mean(map(abs, errors)):.1f} | "
                     f"{statistics.mean(errors):+.1f} | {max(map(abs, errors)):.1f} |")
    return lines


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    """The per-run rows as a CSV file (columns in the rows' key order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)


def selection_lines(rows: Sequence[dict], methods: Sequence[str]) -> List[str]:
    """Table: per method and over all runs, the mean source-only start, last epoch, pick and oracle, and how often
    the pick and the last epoch fall more than HARM_MARGIN points below the start."""
    lines = ['| method | source-only | last | selected | oracle | selected < source-only - 2 | last < source-only - 2 | '
             'guard fired |', '|---|---|---|---|---|---|---|---|']
    for method in tuple(methods) + ('all',):
        sub = [r for r in rows if method in ('all', r['method'])]
        lines.append(
            f"| {method} | {_mean('source_only', sub):.1f} | {_mean('last', sub):.1f} | "
            f"{_mean('selected', sub):.1f} | {_mean('oracle', sub):.1f} | "
            f"{sum(r['selected'] < r['source_only'] - HARM_MARGIN for r in sub)} of {len(sub)} | "
            f"{sum(r['last'] < r['source_only'] - HARM_MARGIN for r in sub)} of {len(sub)} | "
            f"{sum(r['guard_fired'] for r in sub)} of {len(sub)} |")
    return lines


def signed_error_lines(rows: Sequence[dict], columns: Dict[str, str], targets: Sequence[str]) -> List[str]:
    """Table: per target, the mean signed error (estimate - true test accuracy of the pick) of each estimate."""
    lines = ['| target | ' + ' | '.join(columns) + ' |', '|---|' + '---|' * len(columns)]
    for target in targets:
        sub = [r for r in rows if r['target'] == target]
        lines.append(f'| {target} | ' + ' | '.join(
            f"{statistics.mean(r[key] - r['selected'] for r in sub):+.1f}" for key in columns.values()) + ' |')
    return lines


def _mean(key: str, rows: Sequence[dict]) -> float:
    return statistics.mean(r[key] for r in rows)


def analyse(results: Dict[Tuple[int, str, str], dict], out: Path, names: Dict, csv_path: Path) -> List[str]:
    """The study's tables (markdown lines) and the per-run CSV."""
    targets = sorted({t for _, t, _ in results}, key=DOMAINS.index)
    lines = []
    # leave one target out: the rule fitted on the other targets' runs picks on this target's runs
    folds = {}
    for target in targets:
        train = [r for (s, t, m), r in results.items() if t != target]
        folds[target] = fit_rule(train)
    final_rule, final_guard = fit_rule(list(results.values()))
    rows = []
    for (seed, target, method), r in results.items():
        rule, guard = folds[target]
        chosen, fired = pick(r, rule, guard)
        cands = candidates(r)
        rows.append(dict(
            target=target, seed=seed, method=method,
            source_only=round(cands[0]['target_accuracy'], 2), last=round(cands[-1]['target_accuracy'], 2),
            selected=round(chosen['target_accuracy'], 2), oracle=round(max(c['target_accuracy'] for c in cands), 2),
            estimated=round(chosen['estimated_accuracy'], 2), guard_fired=fired, selected_epoch=chosen['epoch'],
            last_epoch=cands[-1]['epoch'], rule=rule, **{f'estimated_{k}': round(v, 2) for k, v in estimates(
                out / names[seed, target, method], chosen['epoch']).items()},
            target_slice_accuracy=round(slice_accuracy(out / names[seed, target, method], chosen['epoch']), 2)))
    write_rows(csv_path, rows)
    lines += selection_lines(rows, METHODS)
    lines += ['', 'Per target (mean over seeds and both methods):', '',
              '| target | rule fitted on the other four targets | source-only | last | selected | oracle | '
              'estimated | guard fired |', '|---|---|---|---|---|---|---|---|']
    for target in targets:
        sub = [r for r in rows if r['target'] == target]
        rule, guard = folds[target]
        lines.append(
            f"| {target} | {rule}, effective >= {guard.min_effective_ratio:g}x, new dead <= {guard.max_new_dead}, "
            f"agreement >= {guard.min_agreement:g}% | {_mean('source_only', sub):.1f} | {_mean('last', sub):.1f} | "
            f"{_mean('selected', sub):.1f} | {_mean('oracle', sub):.1f} | {_mean('estimated', sub):.1f} | "
            f"{sum(r['guard_fired'] for r in sub)} of {len(sub)} |")
    lines += ['', f'Fitted on all five targets (the default of `--select`): {final_rule}, effective classes >= '
                  f'{final_guard.min_effective_ratio:g} x the source-only model\'s, at most {final_guard.max_new_dead} '
                  f'new dead classes, agreement >= {final_guard.min_agreement:g}% while confidence rises.', '']
    # estimates on the picked checkpoints
    lines += ['Label-free accuracy estimates of the picked checkpoints against their true target accuracy:', '',
              '| estimator | mean absolute error | mean signed error (estimate - true) | max absolute error |',
              '|---|---|---|---|']
    columns = estimate_columns(rows)
    lines += estimate_error_lines(rows, columns)
    lines += ['', 'Mean signed error (estimate - true test accuracy) per target: the errors are biases of the '
                  'domain, not noise:', ''] + signed_error_lines(rows, columns, targets)
    # Spearman correlation of each score with the true accuracy over the epochs of each run
    lines += ['', 'Spearman correlation of each label-free score with the true target accuracy over the candidate '
                  'epochs of each run (mean ± std over the runs):', '', '| score | FixMatch | DIDA-Net | all |',
              '|---|---|---|---|']
    for key in LABEL_FREE_KEYS:
        # fitted constants are no scores; runs from before a score existed do not have it
        if key in ('atc_threshold', 'atc_tie_share', 'temperature') or any(
                key not in c for r in results.values() for c in candidates(r)):
            continue
        cells = []
        for method in METHODS + ('all',):
            rhos = [spearman([c[key] for c in candidates(r)], [c['target_accuracy'] for c in candidates(r)])
                    for (s, t, m), r in results.items() if method in ('all', m)]
            rhos = [x for x in rhos if x == x]
            cells.append(f'{statistics.mean(rhos):+.2f} ± {statistics.stdev(rhos):.2f}' if len(rhos) > 1 else 'n/a')
        lines.append(f'| {key} | ' + ' | '.join(cells) + ' |')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', default='cpu', choices=SIZES)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--targets', nargs='+', default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument('--jobs', type=int, default=1, help='runs side by side (CPU threads are split)')
    parser.add_argument('--out', type=Path, default=None, help='run folders (default output/label_free_selection_<size>)')
    parser.add_argument('--csv', type=Path, default=Path('docs/results/label_free_selection.csv'),
                        help='per-run table (target, seed, method, source_only, last, selected, oracle, estimated, '
                             'guard_fired, ...)')
    parser.add_argument('--markdown', type=Path, default=None, help='also write the tables here')
    parser.add_argument('--analyse-only', action='store_true', help='read the finished runs, train nothing')
    args = parser.parse_args()
    study = offline_study(args.size)
    check_options(parser, args, [('seeds', at_least(0)), ('seeds', distinct), ('targets', distinct),
                                 ('jobs', at_least(1))])
    if len(args.targets) < 2:  # before any run trains: the analysis would fail after all of them
        parser.error('--targets: the rules are graded leaving one target out, fitted on the others: give at least 2')
    out = args.out or Path(f'output/label_free_selection_{args.size}')
    grid = study_grid(args.targets, args.seeds)
    if args.analyse_only:
        by_name = finished_results(out, grid.values())
        missing = [n for n in grid.values() if n not in by_name]
        if missing:
            parser.error(f'--analyse-only: {len(missing)} runs are not finished in {out}, e.g. {missing[0]}')
    else:
        by_name = run_all([study_run(study, name, method, target, seed, train_args=KEEP_ALL)
                           for (seed, target, method), name in grid.items()], out, args.jobs)
    results = {key: by_name[name] for key, name in grid.items()}
    lines = [f'{study.description}; leave one domain out, seeds {", ".join(map(str, args.seeds))}, FixMatch '
             f'(`digitnet_compact`) and DIDA-Net (`dida_digitnet_compact`). Target test accuracy (%) of the '
             f'source-only start, the last epoch, the checkpoint the label-free rule selects (its guard fitted on '
             f'the other four targets) and the best epoch by target labels (oracle).', '']
    lines += analyse(results, out, grid, args.csv)
    emit_table(lines, args.markdown)


if __name__ == '__main__':
    main()
