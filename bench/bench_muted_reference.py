"""What the muted reference changes: the default selection with and without it, on the same finished runs.

A DIDA model that adapts from a trained static twin with no source-only phase (`train.py --init-checkpoint TWIN
--source-only-epochs 0`) carries an untrained branch. Since 2026-12-02 the run's label-free reference, the model
the collapse guard compares with and falls back to, is the static network inside it, its branch muted (phase
`static_start`); before, it was the model as loaded, static network plus random branch. Runs made with the muted
reference keep everything the earlier rule needs: this script rebuilds each run's loaded model (same command, same
seed, so the same fresh branch), scores it as the earlier code did, recomputes every epoch's agreement with it from
the saved target probabilities, and replays `--select guarded_last` both ways (paper: `Dynamic Instance Domain
Adaptation`, https://arxiv.org/abs/2203.05028, the shared-start regime of its trained backbones).

    python bench/bench_uda_accuracy.py --shared-start --methods DIDA-Net --targets mnist syn_style --out OUT
    python bench/bench_muted_reference.py OUT/*DIDA-Net-from_shared_start*
"""
import argparse
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from dida_timm.training.options import parse_args
from dida_timm.training.run import Run
from dida_timm.training.selection import CollapseGuard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import pick  # noqa: E402


def target_predictions(run_dir: Path, epoch: int) -> np.ndarray:
    """Predicted classes on the held-out target slice after `epoch`, from the run's saved probabilities."""
    return np.load(run_dir / 'label_free' / f'epoch-{epoch:04d}.npz')['target_probs'].astype(np.float32).argmax(-1)


def unmuted_history(run_dir: Path, results: dict) -> list:
    """The run's history as the earlier code would have written it: epoch 0 scored on the loaded model, agreement
    measured against that model's predictions."""
    argv = shlex.split(results['command'])[2:]  # drop 'python train/train.py'
    with tempfile.TemporaryDirectory() as scratch:
        argv[argv.index('--output') + 1] = scratch
        run = Run(parse_args([a for a in argv if a != '--resume']))
        loaded = run.epoch_row(0, 'start')  # run.evaluated_model: the static weights with the fresh branch
        run.monitor.set_reference(run.evaluated_model, 0, loaded)  # as the earlier code did, from that same pass
    reference = run.monitor.reference_predictions.numpy()
    history = [loaded]
    for row in results['history'][1:]:
        agreement = float((target_predictions(run_dir, row['epoch']) == reference).mean() * 100)
        history.append(dict(row, agreement=agreement))
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', type=Path, nargs='+', help='finished run folders adapting from a shared start')
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the rebuilt runs' own log lines
    print('| run | loaded model | static start | last | shipped before (epoch) | shipped now (epoch) |')
    print('|---|---|---|---|---|---|')
    for run_dir in args.runs:
        results = json.loads((run_dir / 'results.json').read_text())
        if results['history'][0].get('phase') != 'static_start':
            raise SystemExit(f'{run_dir}: its reference is not a muted static start (made before 2026-12-02?)')
        before = dict(results, history=unmuted_history(run_dir, results))
        (now, now_fired), (then, then_fired) = (pick(r, 'guarded_last', CollapseGuard()) for r in (results, before))
        print(f"| {run_dir.name} | {before['history'][0]['target_accuracy']:.1f} | "
              f"{results['history'][0]['target_accuracy']:.1f} | {results['last_target_accuracy']:.1f} | "
              f"{then['target_accuracy']:.1f} ({then['epoch']}{', guard fired' * then_fired}) | "
              f"{now['target_accuracy']:.1f} ({now['epoch']}{', guard fired' * now_fired}) |", flush=True)


if __name__ == '__main__':
    main()
