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
- the mean absolute error of the accuracy estimate on the picked checkpoints;
- the guard's thresholds fitted leave one target out: fitted on four targets' runs, graded on the fifth.

    python bench/bench_label_free_selection.py --jobs 2        # the 30 runs (resumable), then the tables
    python bench/bench_label_free_selection.py --analyse-only --csv docs/results/label_free_selection.csv
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import SIZES, offline_study, run_all, run_name, study_run  # noqa: E402

from dida_timm.data.offline_digits import DOMAINS  # noqa: E402

METHODS = ('FixMatch', 'DIDA-Net')
# every epoch's checkpoint stays, so the pick of any rule can be exported afterwards
KEEP_ALL = ('--keep-checkpoints', '100')


def study_grid(targets, seeds):
    """{(seed, target, method): run name} of the study, seed-major so a study stopped early has whole seeds."""
    return {(seed, target, method): run_name(target, method, {}, seed, KEEP_ALL)
            for seed in seeds for target in targets for method in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', default='cpu', choices=SIZES)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--targets', nargs='+', default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument('--jobs', type=int, default=1, help='runs side by side (CPU threads are split)')
    parser.add_argument('--out', type=Path, default=None, help='run folders (default output/label_free_selection_<size>)')
    args = parser.parse_args()
    study = offline_study(args.size)
    if args.jobs < 1:
        parser.error(f'--jobs: must be >= 1, got {args.jobs}')
    out = args.out or Path(f'output/label_free_selection_{args.size}')
    grid = study_grid(args.targets, args.seeds)
    run_all([study_run(study, name, method, target, seed, train_args=KEEP_ALL)
             for (seed, target, method), name in grid.items()], out, args.jobs)


if __name__ == '__main__':
    main()
