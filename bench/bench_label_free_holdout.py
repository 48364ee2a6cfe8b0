"""The label-free rule and accuracy estimates graded on runs that did not shape them.

`bench_label_free_selection.py` fitted the collapse guard (the default of `--select`) on its own 30 runs, and
compared the label-free accuracy estimators there (ATC, which the runs report; COT, added after those runs had
been seen). This script replays the default rule and every estimator, unchanged, on the finished runs of another
study that logs the same per-epoch scores and probabilities: by default `bench_uda_accuracy.py`'s README-recipe
study (FixMatch, FixMatch with the static branch and DIDA-Net, 5 targets x 3 seeds, `--select last`, so every
epoch is there to choose from). Nothing is fitted here: the runs are new, the domains are the same five.

    python bench/bench_label_free_holdout.py --out output/uda_accuracy_cpu --csv docs/results/label_free_holdout.csv
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_label_free_selection import (  # noqa: E402
    estimate_columns, estimate_error_lines, estimates, selection_lines, signed_error_lines, slice_accuracy, write_rows)
from uda_runs import METHODS, candidates, emit_table, pick, run_name  # noqa: E402

from dida_timm.data.offline_digits import DOMAINS  # noqa: E402
from dida_timm.training.selection import CollapseGuard  # noqa: E402

# the default of train.py's --select and its guard
RULE, GUARD = 'guarded_last', CollapseGuard()


def adapting_runs(out: Path) -> Dict[str, dict]:
    """results.json of every finished run in `out` that adapted after a source-only phase, by folder name."""
    runs = {}
    for path in sorted(out.glob('*/results.json')):
        results = json.loads(path.read_text())
        if results.get('method') == 'fixmatch' and results.get('source_only_epochs', 0) > 0 and \
                (path.parent / 'label_free').is_dir():
            runs[path.parent.name] = results
    return runs


def holdout_row(name: str, results: dict, run_dir: Path) -> dict:
    """One run: its source-only start, last epoch, the default rule's pick, the oracle, and each estimate of the
    pick (with the accuracy on the held-out target slice the estimates read)."""
    chosen, fired = pick(results, RULE, GUARD)
    cands = candidates(results)
    target, method_seed = name.split('-', 1)
    folder_method, seed = method_seed.rsplit('-s', 1)
    # the study's method whose folder form starts the name (option suffixes follow it)
    method = max((m for m in METHODS if folder_method.startswith(run_name('', m, {}, 0)[1:-3])), key=len)
    return dict(
        target=target, seed=int(seed), method=method,
        source_only=round(cands[0]['target_accuracy'], 2), last=round(cands[-1]['target_accuracy'], 2),
        selected=round(chosen['target_accuracy'], 2), oracle=round(max(c['target_accuracy'] for c in cands), 2),
        guard_fired=fired, selected_epoch=chosen['epoch'], last_epoch=cands[-1]['epoch'],
        **{f'estimated_{k}': round(v, 2) for k, v in estimates(run_dir, chosen['epoch']).items()},
        target_slice_accuracy=round(slice_accuracy(run_dir, chosen['epoch']), 2))


def analyse(rows: List[dict]) -> List[str]:
    """The tables (markdown lines)."""
    targets = sorted({r['target'] for r in rows}, key=DOMAINS.index)
    columns = estimate_columns(rows)
    lines = selection_lines(rows, sorted({r['method'] for r in rows}))
    lines += ['', 'Per target (mean over runs):', '', '| target | source-only | last | selected | guard fired |',
              '|---|---|---|---|---|']
    for target in targets:
        sub = [r for r in rows if r['target'] == target]
        lines.append(f"| {target} | {statistics.mean(r['source_only'] for r in sub):.1f} | "
                     f"{statistics.mean(r['last'] for r in sub):.1f} | "
                     f"{statistics.mean(r['selected'] for r in sub):.1f} | "
                     f"{sum(r['guard_fired'] for r in sub)} of {len(sub)} |")
    lines += ['', 'Accuracy estimates of the picked checkpoints against their true target test accuracy:', '',
              '| estimator | mean absolute error | mean signed error (estimate - true) | max absolute error |',
              '|---|---|---|---|'] + estimate_error_lines(rows, columns)
    lines += ['', 'Mean signed error (estimate - true test accuracy) per target:', '']
    return lines + signed_error_lines(rows, columns, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('output/uda_accuracy_cpu'),
                        help="the other study's run folders (they need their label_free/ probabilities)")
    parser.add_argument('--csv', type=Path, default=Path('docs/results/label_free_holdout.csv'), help='per-run table')
    parser.add_argument('--markdown', type=Path, default=None, help='also write the tables here')
    args = parser.parse_args()
    runs = adapting_runs(args.out)
    if not runs:
        parser.error(f'--out: {args.out} holds no finished adapting run with its label_free/ probabilities')
    rows = [holdout_row(name, results, args.out / name) for name, results in runs.items()]
    write_rows(args.csv, rows)
    emit_table([f'{len(rows)} adapting runs in `{args.out.name}`; rule `{RULE}` with the default guard (effective '
                f'classes >= {GUARD.min_effective_ratio:g}x, new dead <= {GUARD.max_new_dead}, agreement >= '
                f'{GUARD.min_agreement:g}%); target test accuracy (%).', ''] + analyse(rows), args.markdown)


if __name__ == '__main__':
    main()
