"""Shared by the accuracy benches: run a grid of `train/train.py` jobs and read back their results.

Each run is a separate process writing to `<out>/<name>/`; a finished run (results.json present) is skipped and
an interrupted one continues from its last checkpoint (`--resume`), so a killed study loses at most one epoch
per run in flight. With `jobs` > 1 the CPU threads are split between the processes (2 single-thread runs side
by side train ~1.1x faster on 2 cores than one after the other, and hide each run's start-up).

A study's per-run records (`write_records`: one CSV row per finished run, the numbers its tables read) travel
where run folders do not: `restore_records` turns them back into results.json files, so a study started on one
machine continues on another.
"""
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import yaml

from dida_timm.data.offline_digits import DOMAINS
from dida_timm.training.options import FIXMATCH_ONLY, build_parser
from dida_timm.training.selection import CollapseGuard, select_checkpoint

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / 'train' / 'train.py'
OFFLINE_RECIPE = TRAIN_SCRIPT.parent / 'configs' / 'offline_digits_cpu.yaml'
OFFLINE_MODEL = 'dida_digitnet_compact'

# name: (runs the study's DIDA model (else its static twin), train.py --method, model kwargs); shared by the
# accuracy study and the ablations
METHODS: Dict[str, Tuple[bool, str, Dict[str, object]]] = {
    'source-only': (False, 'source_only', {}),
    'FixMatch': (False, 'fixmatch', {}),
    'FixMatch + static branch': (True, 'fixmatch', {'dida_dynamic': False}),
    'DIDA-Net': (True, 'fixmatch', {}),
}

# offline benchmark sizes. cpu: for 2 CPU cores (the 60-run study: about 3 hours); full: the README main job's recipe
SIZES = {
    'cpu': dict(train_size=1000, source_only_epochs=3, epochs=12),
    'full': dict(train_size=2000, source_only_epochs=5, epochs=20),
}


def static_twin(model: str) -> str:
    """The timm model a DIDA model adds its branch to, tag kept: dida_resnet18.tv_in1k -> resnet18.tv_in1k."""
    if not model.startswith('dida_'):
        raise ValueError(f'expected a DIDA model (dida_*), got {model!r}')
    return model.removeprefix('dida_')


@dataclass(frozen=True)
class Study:
    """What every run of a leave-one-domain-out study shares.

    Attributes:
        config: train.py YAML config holding the recipe.
        model: The DIDA model; the baselines without a branch use its static twin.
        domains: Every domain; each run's sources are all but its target.
        source_only_epochs: Source-only epochs before adapting (source-only runs train the sum of both).
        epochs: Adapting epochs.
        args: Further train.py arguments of every run (data size or location).
        description: What the study runs on, for table captions.
    """
    config: Path
    model: str
    domains: Tuple[str, ...]
    source_only_epochs: int
    epochs: int
    args: Tuple[str, ...]
    description: str

    def method_model(self, method: str) -> str:
        """The model `method` (a key of METHODS) trains."""
        return self.model if METHODS[method][0] else static_twin(self.model)


def offline_study(size: str) -> Study:
    """The offline digits benchmark with the README recipe at one of SIZES."""
    s = SIZES[size]
    return Study(
        OFFLINE_RECIPE, OFFLINE_MODEL, tuple(DOMAINS), s['source_only_epochs'], s['epochs'],
        ('--offline-train-size', str(s['train_size'])),
        f'Offline digits, size `{size}`: {s["train_size"]:,} train images per domain (test 500), '
        f'{s["source_only_epochs"]} source-only + {s["epochs"]} FixMatch epochs',
    )


def published_study(config: Path, data_dir: Path) -> Study:
    """A published setting (a train/configs file) over all its domains, with the config's own recipe and model."""
    cfg = yaml.safe_load(Path(config).read_text()) or {}
    missing = [k for k in ('dataset', 'model', 'source', 'target', 'epochs') if k not in cfg]
    if missing:
        raise ValueError(f'{config}: a study needs the keys {missing}')
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f'--data-dir {data_dir} is not a folder')
    source_only_epochs = int(cfg.get('source_only_epochs', 0))
    return Study(
        Path(config), cfg['model'], (*cfg['source'], cfg['target']), source_only_epochs, int(cfg['epochs']),
        ('--data-dir', str(data_dir)),
        f'{cfg["dataset"]} (`{Path(config).name}`, the published recipe), {source_only_epochs} source-only + '
        f'{cfg["epochs"]} FixMatch epochs',
    )


@dataclass(frozen=True)
class Run:
    """One training run: its folder name and its train.py arguments (without output flags)."""
    name: str
    args: Tuple[str, ...]


def run_name(
        target: str,
        method: str,
        options: Dict[str, object],
        seed: int,
        train_args: Sequence[str] = (),
        shared_start: bool = False,
) -> str:
    """Folder name of a run: target, method (a key of METHODS), module options and extra arguments, seed."""
    suffix = ''.join(f'-{k.removeprefix("dida_")}{"_".join(map(str, v)) if isinstance(v, list) else v}'
                     for k, v in options.items())
    if train_args:
        suffix += '-' + '_'.join(a.lstrip('-').replace('+', '_') for a in train_args)
    if shared_start:
        suffix += '-from_shared_start'
    return f'{target}-{method.replace(" ", "").replace("+", "_")}{suffix}-s{seed}'


def _run(
        study: Study,
        name: str,
        model: str,
        train_method: str,
        kwargs: Dict[str, object],
        schedule: Tuple[str, ...],
        target: str,
        seed: int,
        train_args: Sequence[str],
) -> Run:
    """The train.py command line of a run adapting to `target` from the study's other domains."""
    if target not in study.domains:
        raise ValueError(f'target {target!r} is not one of the study\'s domains {list(study.domains)}')
    sources = [d for d in study.domains if d != target]
    # JSON is YAML, which is what --model-kwargs parses; the studies report the last epoch (the paper's protocol),
    # the label-free selection study re-selects from the per-epoch history
    if train_method == 'source_only':
        train_args = without_fixmatch_options(train_args)
    return Run(name, ('-c', str(study.config), '--model', model, '--method', train_method, '--select', 'last',
                      '--model-kwargs', json.dumps(kwargs), *schedule, '--source', *sources, '--target', target,
                      '--seed', str(seed), *study.args, *train_args))


def without_fixmatch_options(train_args: Sequence[str]) -> Tuple[str, ...]:
    """`train_args` without the options only FixMatch reads (a recipe's, such as --forward-mode separate, given to
    every run of a study), which train.py refuses for a source-only run: that run is the same without them."""
    actions = build_parser()._option_string_actions

    def action_of(token: str):
        # as argparse reads it: the option itself, or one it abbreviates unambiguously
        name = token.split('=')[0]
        matches = {actions[o] for o in actions if o == name} or {actions[o] for o in actions if o.startswith(name)}
        return matches.pop() if token.startswith('--') and len(matches) == 1 else None

    kept, skip_value = [], False
    for token in train_args:
        if skip_value:
            skip_value = False
            continue
        action = action_of(token)
        if action is not None and action.dest in FIXMATCH_ONLY:
            skip_value = '=' not in token and action.nargs != 0
            continue
        kept.append(token)
    return tuple(kept)


def study_run(
        study: Study,
        name: str,
        method: str,
        target: str,
        seed: int,
        model_kwargs: Optional[Dict[str, object]] = None,
        train_args: Sequence[str] = (),
        start: Optional[Path] = None,
) -> Run:
    """A run of `method` (a key of METHODS) adapting to `target` from the study's other domains.

    Source-only runs train for as many epochs in total as the adapting runs (source-only phase + FixMatch).
    `model_kwargs` are added to the method's own (an ablation of DIDA-Net's module options), `train_args` to the
    command line (an ablation of the training recipe). An adapting run with `start` (weights of a
    `shared_start_run`) skips its own source-only phase and starts from those weights.
    """
    _, train_method, kwargs = METHODS[method]
    if train_method == 'source_only':
        schedule = ('--epochs', str(study.source_only_epochs + study.epochs), '--source-only-epochs', '0')
    elif start is not None:
        schedule = ('--epochs', str(study.epochs), '--source-only-epochs', '0', '--init-checkpoint', str(start))
    else:
        schedule = ('--epochs', str(study.epochs), '--source-only-epochs', str(study.source_only_epochs))
    return _run(study, name, study.method_model(method), train_method, {**kwargs, **(model_kwargs or {})},
                schedule, target, seed, train_args)


def shared_start_run(study: Study, name: str, target: str, seed: int, train_args: Sequence[str] = ()) -> Run:
    """The static twin trained on the sources for the study's source-only epochs: one start for every adapting
    method of a (target, seed), the branch models getting a fresh branch on it (the paper's regime: a trained
    backbone, a new branch)."""
    schedule = ('--epochs', str(study.source_only_epochs), '--source-only-epochs', '0')
    return _run(study, name, static_twin(study.model), 'source_only', {}, schedule, target, seed, train_args)


def candidates(results: dict) -> List[dict]:
    """The source-only model (the last source-only epoch) and every FixMatch epoch of a run's history."""
    start = results['source_only_epochs']
    return [h for h in results['history'] if h['epoch'] >= start]


def pick(results: dict, rule: str, guard: CollapseGuard) -> Tuple[dict, bool]:
    """The candidate row `rule` picks and whether the guard fired."""
    rows = candidates(results)
    selection = select_checkpoint(rows, rule, guard)
    return next(r for r in rows if r['epoch'] == selection.epoch), selection.guard_fired


def finished_results(out: Path, names: Iterable[str]) -> Dict[str, dict]:
    """results.json of the runs among `names` that have finished in `out`, by name."""
    paths = {name: out / name / 'results.json' for name in names}
    return {name: json.loads(p.read_text()) for name, p in paths.items() if p.is_file()}


RECORD_FIELDS = ('run', 'target_accuracy', 'source_only_start_target_accuracy', 'keep_rate', 'pseudo_accuracy',
                 'wall_seconds')


def write_records(path: Path, results: Dict[str, dict]) -> None:
    """One CSV row per run of `results` (name -> results.json): final and source-only-start target accuracy, the
    last FixMatch epoch's kept share and pseudo-label accuracy (empty for a source-only run), wall seconds."""
    with Path(path).open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        writer.writeheader()
        for name, r in sorted(results.items()):
            adapting = [h for h in r['history'] if h['phase'] == 'fixmatch']
            start = r.get('source_only_start_target_accuracy')
            writer.writerow(dict(
                run=name, target_accuracy=round(r['target_accuracy'], 2), wall_seconds=round(r['wall_seconds']),
                source_only_start_target_accuracy='' if start is None else round(start, 2),
                keep_rate=round(adapting[-1]['keep_rate'], 4) if adapting else '',
                pseudo_accuracy=_rounded(adapting[-1]['pseudo_accuracy'] if adapting else None)))


def _rounded(value: Optional[float]) -> Union[float, str]:
    """`value` to 4 decimals; '' for none (no adapting phase, or no pseudo-label kept)."""
    return '' if value is None else round(value, 4)


def restore_records(path: Path, out: Path, names: Iterable[str]) -> List[str]:
    """Write `<out>/<name>/results.json` (the fields the study tables read) for every run of `names` that the
    records at `path` hold and `out` has not finished; returns the restored names."""
    with Path(path).open(newline='') as f:
        records = {row['run']: row for row in csv.DictReader(f)}
    restored = []
    for name in names:
        target = out / name / 'results.json'
        if name not in records or target.is_file():
            continue
        row = records[name]
        history = ([dict(phase='fixmatch', keep_rate=float(row['keep_rate']),
                         pseudo_accuracy=float(row['pseudo_accuracy']) if row['pseudo_accuracy'] else None)]
                   if row['keep_rate'] else [])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(dict(
            target_accuracy=float(row['target_accuracy']), wall_seconds=float(row['wall_seconds']),
            source_only_start_target_accuracy=float(row['source_only_start_target_accuracy'])
            if row['source_only_start_target_accuracy'] else None,
            history=history, restored_from=Path(path).name)))
        restored.append(name)
    return restored


def run_all(runs: Sequence[Run], out: Path, jobs: int = 1) -> Dict[str, dict]:
    """Run every run not finished yet, `jobs` at a time; returns {name: results.json}.

    Raises:
        SystemExit: naming the log of the first run that failed.
    """
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    todo = [r for r in runs if not (out / r.name / 'results.json').is_file()]
    print(f'{len(runs) - len(todo)} of {len(runs)} runs already done in {out}; {len(todo)} to run, {jobs} at a time',
          flush=True)

    def launch(run: Run) -> None:
        log = out / f'{run.name}.log'
        start = time.time()
        with log.open('a') as f:
            code = subprocess.call(
                [sys.executable, str(TRAIN_SCRIPT), *run.args, '--output', str(out), '--experiment', run.name,
                 '--resume', '--no-progress', '--tsne-per-domain', '0'],
                stdout=f, stderr=subprocess.STDOUT, env=env)
        if code:
            raise SystemExit(f'error: run {run.name} failed (exit code {code}); see {log}')
        print(f'done {run.name} in {time.time() - start:.0f} s', flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(launch, r) for r in todo]:
            future.result()
    return finished_results(out, [r.name for r in runs])


def mean_std(values: List[float]) -> str:
    """'mean ± sample std' with one decimal ('mean' alone for one value)."""
    if len(values) == 1:
        return f'{values[0]:.1f}'
    return f'{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}'


def pseudo_label_cells(results: List[dict]) -> Dict[str, str]:
    """Table cells over the seeds of one adapting setting: accuracy after the source-only phase ('start', mean ±
    std, '-' without that phase), final accuracy ('final'), and in the last FixMatch epoch the share of target
    images kept ('kept') and of kept pseudo-labels that were right ('correct'), both as seed means."""
    last = [[h for h in r['history'] if h['phase'] == 'fixmatch'][-1] for r in results]
    starts = [r['source_only_start_target_accuracy'] for r in results]
    return {
        'start': '-' if None in starts else mean_std(starts),  # '-': no source-only phase
        'final': mean_std([r['target_accuracy'] for r in results]),
        'kept': f'{statistics.mean(h["keep_rate"] for h in last):.0%}',
        'correct': mean_pseudo_accuracy(last),
    }


def mean_pseudo_accuracy(rows: List[dict]) -> str:
    """Mean share of kept pseudo-labels that were right over `rows` (epochs that kept none have no share)."""
    shares = [h['pseudo_accuracy'] for h in rows if h['pseudo_accuracy'] is not None]
    return f'{statistics.mean(shares):.0%}' if shares else '-'


def emit_table(lines: List[str], markdown: Optional[Path]) -> None:
    """Print a markdown table (with its caption lines) and also write it to `markdown` when given."""
    table = '\n'.join(lines)
    print('\n' + table)
    if markdown:
        markdown.write_text(table + '\n')
