"""The options of a training run (train/train.py): the parser, the checks every value passes where it is parsed
(command line and config files alike), and the defaults that depend on the dataset and the model.

A value that makes no sense stops the command with one `error: --option: why` line and exit code 2.
"""
import argparse
from functools import lru_cache
from pathlib import Path
from typing import AbstractSet, Any, Dict, FrozenSet, List

import torch
import yaml
from timm.data import rand_augment_transform
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from ..arguments import (
    at_least, between, check_options, config_defaults, distinct, greater_than, increasing, option_name,
    usable_device, yaml_value)
from ..data import DATASETS, dataset_domains, default_domains
from ..data.transforms import FIXMATCH_RAND_AUGMENT
from ..models.factory import create_model
from ..inference import smallest_input_size
from .mixstyle import mixstyle_target
from .report import tsne_perplexity
from .selection import ATC_SCORES, RULES

__all__ = ['build_parser', 'changed_run_options', 'check_args', 'create_optimizer', 'create_scheduler',
           'differing_options', 'parse_args']

# timm's schedules that step per update, as the training loop does: not 'plateau' (a per-epoch metric) nor 'none'
# (no warm-up, and no per-group lr scale: the branch and classifier would silently train at the backbone's rate)
SCHEDULES = ('cosine', 'tanh', 'step', 'multistep', 'constant', 'poly', 'wsd', 'rsqrt')
# the lr a warm-up starts from (timm's default), scaled like --lr by each parameter group's lr scale
WARMUP_LR = 1e-5
# options only FixMatch's step and strong view read: a source-only run trains on the source's weak view alone (not
# --threshold: the label-free scores every run records count the pseudo-labels FixMatch would keep at it)
FIXMATCH_ONLY = ('soft_weighting', 'unlabelled_stream', 'forward_mode', 'unlabelled_weight', 'pseudo_label_dropout',
                 'rand_augment', 'cutout')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', default='', help='YAML file of argument defaults (CLI flags override it)')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='offline_digits', choices=sorted(DATASETS),
                   help='offline_digits | folder | pacs | office_home | domainnet | digit_five')
    g.add_argument('--data-dir', default=None, help='dataset root (offline_digits: its cache folder)')
    g.add_argument('--source', nargs='+', default=None,
                   help='labelled domains (default: every domain of the dataset but the target)')
    g.add_argument('--target', default=None,
                   help='the target domain of --dataset, its labels used for evaluation only (default: the '
                        'dataset\'s first, e.g. mnistm_style, art_painting)')
    g.add_argument('--target-dir', default='',
                   help='a folder of UNLABELLED target images (any layout; sub-folder names are ignored); replaces '
                        '--target')
    g.add_argument('--target-eval-dir', default='',
                   help='labelled target images to evaluate on (class folders), with --target-dir')
    g.add_argument('--source-val-fraction', type=float, default=0.1,
                   help='share of each source domain held out (never trained on) for source validation')
    g.add_argument('--target-val-fraction', type=float, default=0.2,
                   help='share of the unlabelled target held out (never trained on) for the label-free scores')
    g.add_argument('--val-max-images', type=int, default=1000, help='cap on each held-out slice')
    g.add_argument('--source-split', default='train')
    g.add_argument('--target-train-split', default='train', help='unlabelled target images trained on')
    g.add_argument('--target-test-split', default='test', help='labelled target images evaluated on')
    g.add_argument('--offline-train-size', type=int, default=2000, help='offline_digits: train images per domain')
    g.add_argument('--offline-test-size', type=int, default=500, help='offline_digits: test images per domain')
    g.add_argument('--workers', type=int, default=0)
    g = p.add_argument_group('model')
    g.add_argument('--model', default='dida_digitnet_compact', help='any timm model name, with an optional .tag')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False,
                   help='start from the tag\'s pretrained weights (--no-pretrained overrides a config)')
    g.add_argument('--allow-pickle', action=argparse.BooleanOptionalAction, default=False,
                   help='let a hf-hub: / local-dir: model without model.safetensors load pickled weights')
    g.add_argument('--init-checkpoint', default='',
                   help='weights to start from (safetensors, or a weights-only torch file): the model\'s own, or its '
                        'static twin\'s (e.g. a source-trained digitnet_compact for dida_digitnet_compact), whose '
                        'branch then starts fresh')
    g.add_argument('--model-kwargs', default={}, type=yaml_value,
                   help='extra timm.create_model kwargs as YAML, e.g. "{branch_depth: 1}"')
    g.add_argument('--mixstyle-after', default='', help='module whose output MixStyle mixes (e.g. layer1, block1)')
    g.add_argument('--input-size', type=int, default=None,
                   help='default: the model\'s pretrained_cfg; at least the model\'s total stride')
    g = p.add_argument_group('method')
    g.add_argument('--method', default='fixmatch', choices=['fixmatch', 'source_only'])
    g.add_argument('--threshold', type=float, default=0.95)
    g.add_argument('--soft-weighting', action=argparse.BooleanOptionalAction, default=False,
                   help='confidence-weighted pseudo-labels (DomainNet), none dropped: --threshold does not apply')
    g.add_argument('--unlabelled-stream', default='target', choices=['target', 'source+target'])
    g.add_argument('--forward-mode', default='joint', choices=['joint', 'separate'])
    g.add_argument('--pseudo-label-dropout', action=argparse.BooleanOptionalAction, default=True,
                   help='dropout active in the pseudo-label pass (off: only with --forward-mode separate)')
    g.add_argument('--unlabelled-weight', type=float, default=1.0)
    g.add_argument('--source-only-epochs', type=int, default=0, help='source-only phase before adapting')
    g.add_argument('--select', default='guarded_last', choices=sorted(RULES),
                   help='which checkpoint the run reports, exports and ships: last = the last epoch; guarded_* = '
                        'among the source-only model and the epochs the collapse guard does not flag, the latest '
                        '(guarded_last) or the one with the highest estimated accuracy (guarded_estimate)')
    g.add_argument('--atc-score', default='max_prob', choices=ATC_SCORES,
                   help='confidence score of the label-free accuracy estimate (ATC)')
    g = p.add_argument_group('augmentation')
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--translate', type=float, default=0.0)
    g.add_argument('--rand-augment', default='rand-m10-n2-mstd0.5',
                   help=f"strong view: a timm RandAugment string, or {FIXMATCH_RAND_AUGMENT!r} (FixMatch's op list and "
                        "Cutout)")
    g.add_argument('--cutout', type=int, default=16, help='side of the Cutout square (px), below the input size')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('--batch-size', type=int, default=32, help='per source domain and for the target, per process')
    g.add_argument('--opt', default='sgd', help='a timm optimizer name (timm.optim.list_optimizers())')
    g.add_argument('--lr', type=float, default=0.05, help='backbone learning rate')
    g.add_argument('--new-lr-scale', type=float, default=None,
                   help='learning-rate multiplier of branch + classifier (default: 10 with --pretrained, as the '
                        'paper trains the new layers beside a pretrained backbone; else 1)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--opt-betas', type=float, nargs=2, default=None)
    g.add_argument('--weight-decay', type=float, default=5e-4)
    g.add_argument('--sched', default='cosine', choices=SCHEDULES,
                   help='a timm schedule, stepped every update (\'constant\': warm-up and lr scales, no decay)')
    g.add_argument('--decay-epochs', type=float, default=None,
                   help="--sched step: decay the lr by --decay-rate every this many epochs of a phase")
    g.add_argument('--decay-milestones', type=int, nargs='+', default=None,
                   help="--sched multistep: the epochs of a phase at which the lr decays by --decay-rate")
    g.add_argument('--decay-rate', type=float, default=0.1,
                   help="lr factor of each step / multistep decay (timm: the power of --sched poly)")
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--ema-decay', type=float, default=0.0, help='> 0 keeps an EMA of the weights (evaluated)')
    g = p.add_argument_group('runtime')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--dist-timeout', type=float, default=600, help='seconds a rank waits for the others (torchrun)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='autocast (bfloat16 on CPU, float16 + scaler on CUDA)')
    g.add_argument('--grad-checkpointing', action=argparse.BooleanOptionalAction, default=False,
                   help='recompute the blocks in the backward to save memory; the recomputation moves the batch '
                        "norms' running statistics a second time each step, so the run differs from one without it")
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the model')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--deterministic', action=argparse.BooleanOptionalAction, default=False,
                   help='deterministic kernels (bitwise resume on CPU)')
    g = p.add_argument_group('output')
    g.add_argument('--output', default='output')
    g.add_argument('--experiment', default='', help='run folder name (default: time, model, target, method)')
    g.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False,
                   help='continue the run --experiment names')
    g.add_argument('--keep-checkpoints', type=int, default=2)
    g.add_argument('--eval-batch-size', type=int, default=256)
    g.add_argument('--tsne-per-domain', type=int, default=300, help='0 skips the t-SNE picture')
    g.add_argument('--no-progress', action='store_true', help='no progress bars (they only show on a terminal)')
    # the flag's own negation (BooleanOptionalAction's would be --no-no-progress), to override a config
    g.add_argument('--progress', dest='no_progress', action='store_false', default=False,
                   help='progress bars on a terminal (overrides a config\'s no_progress: true)')
    return p


# each option's valid values; options whose limits depend on others (input size, cutout, warmup, domains)
# are checked in check_args below
OPTION_RULES = [
    ('offline_train_size', at_least(10)), ('offline_test_size', at_least(10)), ('workers', at_least(0)),
    ('source', distinct), ('source_val_fraction', between(0, 1, high_open=True, low_open=True)),
    ('target_val_fraction', between(0, 1, high_open=True, low_open=True)), ('val_max_images', at_least(1)),
    ('input_size', at_least(1)),
    ('threshold', between(0, 1)), ('unlabelled_weight', at_least(0)), ('source_only_epochs', at_least(0)),
    ('translate', between(0, 1)), ('cutout', at_least(0)),
    ('epochs', at_least(1)), ('batch_size', at_least(1)), ('lr', at_least(0)), ('new_lr_scale', at_least(0)),
    ('momentum', between(0, 1, high_open=True)), ('opt_betas', between(0, 1, high_open=True)),
    ('weight_decay', at_least(0)), ('warmup_epochs', at_least(0)), ('min_lr', at_least(0)),
    ('clip_grad', greater_than(0)), ('ema_decay', between(0, 1, high_open=True)),
    # torch holds --dist-timeout in int64 nanoseconds (9.2e9 s): 1e10 s wrapped round and timed out at once
    ('dist_timeout', between(0, 10 ** 9, low_open=True)), ('seed', between(0, 2 ** 32, high_open=True)),
    ('decay_epochs', greater_than(0)), ('decay_milestones', at_least(1)), ('decay_milestones', increasing),
    ('keep_checkpoints', at_least(1)), ('eval_batch_size', at_least(1)), ('tsne_per_domain', at_least(0)),
    ('device', usable_device),
]


@lru_cache(maxsize=None)
def _built_in_defaults() -> Dict[str, Any]:
    """Every option's default as build_parser gives it, before a config's values replace the parser's own."""
    return {action.dest: action.default for action in build_parser()._actions}


def _given(args: argparse.Namespace, dest: str) -> bool:
    """Whether an option was set, on the command line or in a config: its value is not the built-in default.

    Not parser.get_default: parse_args makes a config's values the parser's defaults, which would pass unchecked.
    """
    return getattr(args, dest) != _built_in_defaults()[dest]


def create_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer --opt names, with the run's --lr, --weight-decay, --momentum and --opt-betas."""
    kwargs = dict(betas=tuple(args.opt_betas)) if args.opt_betas else {}
    return create_optimizer_v2(params, args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               **kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, epochs: int,
                     updates_per_epoch: int) -> Scheduler:
    """The --sched schedule over `epochs` (one phase), with --warmup-epochs and --min-lr, stepped every update."""
    decay = dict(decay_epochs=args.decay_epochs) if args.decay_epochs else {}
    if args.decay_milestones:
        decay.update(decay_milestones=args.decay_milestones)
    scheduler, _ = create_scheduler_v2(optimizer, args.sched, num_epochs=epochs, warmup_epochs=args.warmup_epochs,
                                       warmup_lr=WARMUP_LR, min_lr=args.min_lr, updates_per_epoch=updates_per_epoch,
                                       step_on_epochs=False, decay_rate=args.decay_rate, **decay)
    return scheduler


def _check_optimiser(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Build the optimizer on a stand-in parameter: a wrong name or option combination stops the command now,
    naming the option, instead of after the data are prepared (--sched is checked by its choices)."""
    # timm's own name of the optimizer: the last part, after a 'lookahead_' prefix
    name = args.opt.lower().split('_')[-1]
    try:
        create_optimizer([torch.nn.Parameter(torch.zeros(1))], args)
    except (ValueError, TypeError, ImportError, AssertionError) as e:
        # torch's Nesterov SGD refuses a zero momentum, in words that name neither option
        if args.momentum == 0 and name in list_optimizers() and (get_optimizer_info(name).defaults or {}).get(
                'nesterov'):
            parser.error(f"--momentum: timm's {name} is Nesterov SGD, which needs a momentum > 0; use --opt "
                         f"{args.opt.lower()[:-len(name)]}momentum for SGD without Nesterov")
        parser.error(f'--opt: {args.opt!r}: {e}')
    # timm drops the betas and momentum an optimizer does not take
    info = get_optimizer_info(name)
    # the training loop calls loss.backward() alone: a Hessian-based step fails there, after the data are prepared
    if info.second_order:
        parser.error(f'--opt: {args.opt} is a second-order optimizer (needs backward(create_graph=True)), which '
                     'train.py does not run')
    if args.opt_betas and not info.has_betas:
        parser.error(f'--opt-betas: {args.opt} takes no betas (Adam-like optimizers do), got {args.opt_betas}')
    if _given(args, 'momentum') and not info.has_momentum:
        parser.error(f'--momentum: {args.opt} takes no momentum (SGD-like optimizers do; Adam-like ones take '
                     f'--opt-betas), got {args.momentum}')


def check_args(
        args: argparse.Namespace,
        parser: argparse.ArgumentParser,
        on_command_line: AbstractSet[str],
) -> argparse.Namespace:
    """Refuse what makes no sense (`error: --option: why`, exit 2) and fill the defaults that depend on the
    dataset (its domains) and the model (its input size), so args.yaml records what the run uses.

    `on_command_line` holds the options the command line set (the rest are a config's or built-in): a recipe's
    FixMatch options stay part of it when the same config runs its source-only baseline.
    """
    if args.new_lr_scale is None:
        args.new_lr_scale = 10.0 if args.pretrained else 1.0
    check_options(parser, args, OPTION_RULES)
    try:
        domains = dataset_domains(args.dataset, args.data_dir)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f'--data-dir: {e}')
    # with --target-dir the target is that folder, not a domain of the dataset: every domain may be a source
    target_is_domain = not args.target_dir
    for dest in ('source', 'target') if target_is_domain else ('source',):
        unknown = [d for d in ([args.target] if dest == 'target' else args.source or []) if d is not None
                   and d not in domains]
        if unknown:
            parser.error(f'--{dest}: {", ".join(map(repr, unknown))} not a domain of {args.dataset}; its domains '
                         f'are {list(domains)}')
    if not target_is_domain:
        args.source = args.source or list(domains)
        if not args.source:
            parser.error(f'--source: {args.data_dir} has no sub-folders to use as source domains')
        # the target is named by its folder, and every domain's results are keyed by name
        name = Path(args.target_dir).resolve().name
        if name in args.source:
            parser.error(f'--target-dir: the folder {args.target_dir} is named like the source domain {name!r}; '
                         'rename it or leave that domain out of --source')
    else:
        if args.target is not None and args.target in (args.source or []):
            parser.error(f'--target: the target {args.target!r} is also a source')
        try:
            args.source, args.target = default_domains(args.dataset, args.data_dir, args.source, args.target)
        except ValueError as e:
            parser.error(f'--source/--target: {e}')
    if args.resume and not args.experiment:
        parser.error('--resume: needs --experiment, the run folder to continue')
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f'--output: {args.output} exists and is not a folder (the runs are written in its sub-folders)')
    for option in ('target_dir', 'target_eval_dir'):
        folder = getattr(args, option)
        if folder and not Path(folder).is_dir():
            parser.error(f'--{option.replace("_", "-")}: {folder} is not a folder')
    if args.target_eval_dir and not args.target_dir:
        parser.error('--target-eval-dir: goes with --target-dir (a --target domain brings its own test split)')
    if args.dataset != 'offline_digits':
        for dest in ('offline_train_size', 'offline_test_size'):
            if _given(args, dest):
                parser.error(f'{option_name(parser, dest)}: sizes the offline_digits benchmark, not --dataset '
                             f'{args.dataset}')
    # the picture shows that many images of every source and of the target
    points = args.tsne_per_domain * (len(args.source) + 1)
    if args.tsne_per_domain and tsne_perplexity(points) >= points:
        parser.error(f'--tsne-per-domain: {points} images ({args.tsne_per_domain} of each of {len(args.source) + 1} '
                     f'domains) are too few for the t-SNE, whose perplexity {tsne_perplexity(points)} must be below '
                     'them; show more, or 0 to skip the picture')
    if args.init_checkpoint and not Path(args.init_checkpoint).is_file():
        parser.error(f'--init-checkpoint: {args.init_checkpoint} is not a file')
    if not isinstance(args.model_kwargs, dict):
        parser.error(f'--model-kwargs: must be a mapping such as "{{branch_depth: 1}}", got {args.model_kwargs!r}')
    # `{drop_rate}` or `drop_rate:` reads as None, which timm.create_model drops without a word
    unset = [key for key, value in args.model_kwargs.items() if value is None]
    if unset:
        parser.error(f'--model-kwargs: {unset} given without a value; write "{{{unset[0]}: VALUE}}"')
    reserved = sorted(set(args.model_kwargs) & {'num_classes', 'pretrained', 'allow_pickle'})
    if reserved:
        parser.error(f'--model-kwargs: {reserved} are set by the run (the class count from the data, --pretrained, '
                     '--allow-pickle): leave them out')
    described = f'{args.model}{f" with {args.model_kwargs}" if args.model_kwargs else ""}'
    try:
        model = create_model(args.model, **args.model_kwargs)
    except (RuntimeError, ValueError, TypeError, FileNotFoundError, AssertionError) as e:
        parser.error(f'--model: {described}: {e}')
    if args.mixstyle_after:
        try:
            mixstyle_target(model, args.mixstyle_after)
        except ValueError as e:
            parser.error(f'--mixstyle-after: {e}')
    default_size = model.pretrained_cfg['input_size'][-1]
    size = args.input_size or default_size
    smallest = smallest_input_size(model)
    if size < smallest:
        parser.error(f'--input-size: {args.model} takes at least {smallest} px (its total stride), got {size}')
    if model.pretrained_cfg.get('fixed_input_size') and size != default_size:
        parser.error(f'--input-size: {args.model} takes only {default_size} px, got {size}')
    args.input_size = size
    # kwargs such as global_pool='' or in_chans=1 build a model that the run's RGB batches break, or that gives
    # feature maps rather than logits: one image shows it now rather than after the data are built (in eval mode:
    # batch norm cannot train on one image)
    option = '--model-kwargs' if args.model_kwargs else '--input-size'
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        parser.error(f'{option}: {described} fails on a {size} px RGB image: {e}')
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        output = f'shape {tuple(logits.shape)}' if isinstance(logits, torch.Tensor) else f'a {type(logits).__name__}'
        parser.error(f'{option}: {described} gives {output} for one image, not (1, classes) logits')
    # what a command asks for that its run would not do: refused as given on the command line only (a config's recipe
    # serves its source-only baseline too), and not on --resume (a run started before these checks must finish)
    asked = on_command_line if not args.resume else frozenset()
    if args.method == 'source_only':
        # each would be ignored without a word: as given, a switched-off flag by its --no- form
        unused = [option_name(parser, dest) if getattr(args, dest) is not False else f'--no-{dest.replace("_", "-")}'
                  for dest in FIXMATCH_ONLY if _given(args, dest) and dest in asked]
        if unused:
            parser.error(f'{unused[0]}: only FixMatch uses {", ".join(unused)}; --method source_only would ignore '
                         f'{"them" if len(unused) > 1 else "it"}')
        # guarded_last, the default, is a source-only run's last epoch too: only an explicit other rule is refused
        if 'select' in asked and args.select not in (_built_in_defaults()['select'], 'last'):
            parser.error(f'--select: a source-only run reports its last epoch (there is no adaptation to select '
                         f'from), not {args.select}; leave --select out')
        if 'source_only_epochs' in asked and args.source_only_epochs:
            parser.error(f'--source-only-epochs: with --method source_only the whole run is source-only (a second '
                         f'phase would restart the lr schedule); give its length with --epochs, e.g. --epochs '
                         f'{args.source_only_epochs + args.epochs}')
    elif args.cutout >= size:
        parser.error(f'--cutout: a {args.cutout} px square covers the whole {size} px input; use less than {size} '
                     '(0 turns Cutout off)')
    # the confidence weights keep every pseudo-label: the threshold would change nothing (a source-only run's
    # label-free scores count the pseudo-labels kept at it, and it weights none)
    if args.method == 'fixmatch' and args.soft_weighting and 'threshold' in asked and _given(args, 'threshold'):
        parser.error(f'--threshold: --soft-weighting weights every pseudo-label by its confidence and drops none, so '
                     f'{args.threshold} would change nothing; give one of the two')
    phases = [n for n in (args.source_only_epochs, args.epochs) if n]
    if args.warmup_epochs and args.warmup_epochs >= min(phases):
        parser.error(f'--warmup-epochs: {args.warmup_epochs} warm-up epochs leave nothing of a {min(phases)}-epoch '
                     'phase (every phase warms up)')
    if args.warmup_epochs and args.lr < WARMUP_LR:
        parser.error(f'--warmup-epochs: the warm-up starts from {WARMUP_LR}, above --lr {args.lr}, so it would lower '
                     'the lr instead of raising it (use --warmup-epochs 0 with this --lr)')
    if not args.pseudo_label_dropout and args.forward_mode == 'joint':
        parser.error('--no-pseudo-label-dropout: needs --forward-mode separate (the joint pass computes the '
                     'pseudo-labels in the same pass as the strong views)')
    # timm's step / multistep defaults decay at epoch 90 (and 180, 270): never, in most phases
    for sched, option, given in (('step', 'decay_epochs', args.decay_epochs),
                                 ('multistep', 'decay_milestones', args.decay_milestones)):
        flag = option_name(parser, option)
        if args.sched == sched and not given:
            parser.error(f'--sched: {sched} needs {flag}, the epochs of a phase at which the lr decays')
        if given and args.sched != sched:
            parser.error(f'{flag}: goes with --sched {sched}, not {args.sched}')
        if given and max(given if isinstance(given, list) else [given]) >= max(phases):
            parser.error(f'{flag}: {given} falls at or after the end of the longest phase ({max(phases)} epochs), '
                         'so the lr would never decay there')
    if _given(args, 'decay_rate') and args.sched not in ('step', 'multistep', 'poly'):
        parser.error(f'--decay-rate: --sched {args.sched} has no decay rate (step, multistep and poly do)')
    # step / multistep multiply the lr by the rate at each decay; poly (timm) takes it as the power of its decay
    rate = between(0, 1, low_open=True) if args.sched in ('step', 'multistep') else greater_than(0)
    why = rate(args.decay_rate)
    if why:
        use = 'the power of its decay' if args.sched == 'poly' else 'the lr factor of each decay'
        parser.error(f'--decay-rate: with --sched {args.sched} it is {use}: {why}')
    if args.min_lr and args.sched in ('step', 'multistep', 'constant'):
        parser.error(f'--min-lr: --sched {args.sched} has no lr floor, timm ignores it (cosine, tanh, poly, wsd and '
                     'rsqrt take one)')
    if args.sched == 'rsqrt' and not args.warmup_epochs:
        parser.error('--sched rsqrt: its lr falls as 1 / sqrt(t / timescale), and timm takes the timescale from '
                     '--warmup-epochs: give --warmup-epochs > 0')
    if args.min_lr > args.lr:
        parser.error(f'--min-lr: {args.min_lr} is above --lr {args.lr}')
    _check_optimiser(args, parser)
    if args.rand_augment and args.rand_augment != FIXMATCH_RAND_AUGMENT:
        try:
            rand_augment_transform(args.rand_augment, {})
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            parser.error(f'--rand-augment: {args.rand_augment!r} is neither {FIXMATCH_RAND_AUGMENT!r} nor a timm '
                         f'RandAugment string such as rand-m10-n2-mstd0.5 ({type(e).__name__}: {e})')
    # recorded absolute in args.yaml, so that the run resumes (`-c RUN/args.yaml --resume`) from any working directory
    for dest in ('data_dir', 'output', 'target_dir', 'target_eval_dir', 'init_checkpoint'):
        if getattr(args, dest):
            setattr(args, dest, str(Path(getattr(args, dest)).expanduser().resolve()))
    return args


# options a resumed run may change: where things are, how fast they run and the run's name, not what it computes
# (not --workers: the strong view's random draws come from each loader worker's own generator, so another count
# draws other augmentations; not --grad-checkpointing: torch's checkpoint reruns the blocks' forward in train mode,
# which updates their batch norms' running statistics again)
RESUMABLE_CHANGES = frozenset({
    'resume', 'experiment', 'data_dir', 'output', 'device', 'dist_timeout', 'compile', 'channels_last',
    'deterministic', 'eval_batch_size', 'keep_checkpoints', 'no_progress', 'tsne_per_domain', 'config'})
# options holding a path: equal when they name the same file or folder
_PATH_OPTIONS = frozenset({'target_dir', 'target_eval_dir', 'init_checkpoint'})


def differing_options(old: Dict, new: Dict, free: FrozenSet[str] = RESUMABLE_CHANGES) -> List[str]:
    """The options two runs' recorded arguments (args.yaml) set differently, as '--name old -> new', leaving out
    those in `free` and those only one of them records (written by another version of this package)."""
    def value(key: str, recorded):
        return str(Path(recorded).resolve()) if key in _PATH_OPTIONS and recorded else recorded
    return [f"--{key.replace('_', '-')} {old[key]!r} -> {new[key]!r}" for key in new
            if key not in free and key in old and value(key, old[key]) != value(key, new[key])]


def changed_run_options(saved: Dict, args: argparse.Namespace) -> List[str]:
    """The options of `args` that differ from `saved` (the run's args.yaml) and that a resumed run may not change.

    A checkpoint holds the optimizer's and scheduler's state, schedule length and learning rates included: resumed
    under other epochs or rates, the run would go on with the old ones while recording the new.
    """
    # tuples as lists, as args.yaml holds them
    return differing_options(saved, yaml.safe_load(yaml.safe_dump(vars(args), sort_keys=False)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', action='append', default=[])
    known, remaining = config_parser.parse_known_args(argv)
    if len(known.config) > 1:  # a plain option would keep the last and drop the others' values without a word
        parser.error(f'--config: given {len(known.config)} times ({", ".join(known.config)}); give one')
    config = known.config[0] if known.config else ''
    if config:
        parser.set_defaults(**config_defaults(parser, Path(config)))
    args = parser.parse_args(remaining)
    args.config = config
    return check_args(args, parser, _command_line_options(remaining))


def _command_line_options(argv: List[str]) -> FrozenSet[str]:
    """The options `argv` sets itself, whatever a config sets: parsed with no defaults at all."""
    bare = build_parser()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(bare.parse_args(argv)))


