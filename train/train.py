#!/usr/bin/env python3
"""Adapt a timm classifier to an unlabelled target domain: DIDA-Net's recipe (FixMatch + DIDA branch).

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028 (SPEC section 3).

    python train/train.py -c train/configs/offline_digits_cpu.yaml            # the README's main job
    python train/train.py --model dida_resnet18.tv_in1k --pretrained --dataset pacs --data-dir /data/pacs \\
        --source art_painting cartoon photo --target sketch -c train/configs/pacs.yaml
    torchrun --nproc_per_node 2 train/train.py -c ...                        # DDP, gloo on CPU / nccl on GPU

`--model resnet18` gives the FixMatch baseline, `--model dida_resnet18` DIDA-Net, `--method source_only`
the source-only baseline. With `--source-only-epochs N` the run first trains on the source alone (that model
is the source-only starting point, evaluated and reported) and then adapts it; `--init-checkpoint` starts from
given weights instead, e.g. DIDA-Net from a trained static twin with a fresh branch. Batch sizes are per process
and per domain: a step sees K x B source images and B target images on every rank.

Writes to --output/<experiment>: args.yaml, log.txt, summary.csv, checkpoints/, model.safetensors,
results.json and the report pictures (confusion matrix, t-SNE, curves).
"""
import argparse
import csv
import json
import logging
import os
import random
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
import yaml
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import ConcatDataset, DataLoader

import dida_timm  # noqa: F401  registers the models
from dida_timm.data import (
    CyclingBatchSampler, DomainBalancedSampler, TransformedDataset, TwoViewDataset, create_domain_datasets,
    create_uda_transforms)
from dida_timm.training import (
    MixStyle, MultiViewModel, NonFiniteLossError, UdaConfig, attach_mixstyle, evaluate, extract_features,
    load_last_checkpoint, save_checkpoint, train_one_epoch, uda_param_groups)
from dida_timm.inference import create_model
from dida_timm.models import static_twin_filter_fn
from dida_timm.training.checkpoint import rng_state
from dida_timm.training.distributed import init_distributed
from dida_timm.training.report import write_report

_logger = logging.getLogger('train')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', default='', help='YAML file of argument defaults (CLI flags override it)')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='offline_digits',
                   help='offline_digits | folder | pacs | office_home | domainnet | digit_five')
    g.add_argument('--data-dir', default=None, help='dataset root (offline_digits: its cache folder)')
    g.add_argument('--source', nargs='+', default=['mnist', 'syn_style', 'svhn_style', 'uci_digits'])
    g.add_argument('--target', default='mnistm_style')
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
    g.add_argument('--allow-pickle', action='store_true',
                   help='let a hf-hub: / local-dir: model without model.safetensors load pickled weights')
    g.add_argument('--init-checkpoint', default='',
                   help='weights to start from (safetensors, or a weights-only torch file): the model\'s own, or its '
                        'static twin\'s (e.g. a source-trained digitnet_compact for dida_digitnet_compact), whose '
                        'branch then starts fresh')
    g.add_argument('--model-kwargs', default={}, type=yaml.safe_load,
                   help='extra timm.create_model kwargs as YAML, e.g. "{branch_depth: 1}"')
    g.add_argument('--mixstyle-after', default='', help='module whose output MixStyle mixes (e.g. layer1, block1)')
    g.add_argument('--input-size', type=int, default=None, help='default: the model\'s pretrained_cfg')
    g = p.add_argument_group('method')
    g.add_argument('--method', default='fixmatch', choices=['fixmatch', 'source_only'])
    g.add_argument('--threshold', type=float, default=0.95)
    g.add_argument('--soft-weighting', action='store_true', help='confidence-weighted pseudo-labels (DomainNet)')
    g.add_argument('--unlabelled-stream', default='target', choices=['target', 'source+target'])
    g.add_argument('--forward-mode', default='joint', choices=['joint', 'separate'])
    g.add_argument('--unlabelled-weight', type=float, default=1.0)
    g.add_argument('--source-only-epochs', type=int, default=0, help='source-only phase before adapting')
    g = p.add_argument_group('augmentation')
    g.add_argument('--flip', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--translate', type=float, default=0.0)
    g.add_argument('--rand-augment', default='rand-m10-n2-mstd0.5',
                   help="strong view: a timm RandAugment string, or 'fixmatch' (FixMatch's op list and Cutout)")
    g.add_argument('--cutout', type=int, default=16)
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('--batch-size', type=int, default=32, help='per source domain and for the target, per process')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--lr', type=float, default=0.05, help='backbone learning rate')
    g.add_argument('--new-lr-scale', type=float, default=1.0, help='learning-rate multiplier of branch + classifier')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--opt-betas', type=float, nargs=2, default=None)
    g.add_argument('--weight-decay', type=float, default=5e-4)
    g.add_argument('--sched', default='cosine')
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--ema-decay', type=float, default=0.0, help='> 0 keeps an EMA of the weights (evaluated)')
    g = p.add_argument_group('runtime')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--dist-timeout', type=float, default=600, help='seconds a rank waits for the others (torchrun)')
    g.add_argument('--amp', action='store_true', help='autocast (bfloat16 on CPU, float16 + scaler on CUDA)')
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--deterministic', action='store_true', help='deterministic kernels (bitwise resume on CPU)')
    g = p.add_argument_group('output')
    g.add_argument('--output', default='output')
    g.add_argument('--experiment', default='', help='run folder name (default: time, model, target, method)')
    g.add_argument('--resume', action='store_true', help='continue the run --experiment names')
    g.add_argument('--keep-checkpoints', type=int, default=2)
    g.add_argument('--eval-batch-size', type=int, default=256)
    g.add_argument('--tsne-per-domain', type=int, default=300, help='0 skips the t-SNE picture')
    g.add_argument('--no-progress', action='store_true')
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f'config file not found: {path}')
        cfg = yaml.safe_load(path.read_text()) or {}
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            parser.error(f'{path}: unknown keys {unknown}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = known.config
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


class Run:
    """The wiring of one training run (datasets, model, phases, checkpoints, report)."""

    def __init__(self, args: argparse.Namespace, command: str = ''):
        self.args = args
        self.command = command
        self.device, self.rank, self.world_size = init_distributed(args.device, args.dist_timeout)
        self.is_main = self.rank == 0
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if args.resume and not args.experiment:
            raise SystemExit('error: --resume needs --experiment, the run folder to continue')
        name = args.experiment or '-'.join([
            time.strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_').replace(':', '_'), args.target, args.method])
        self.out_dir = Path(args.output) / name
        if self.is_main:
            if self.out_dir.exists() and any(self.out_dir.iterdir()) and not args.resume:
                raise SystemExit(f'error: {self.out_dir} already holds a run; pass --resume to continue it or '
                                 f'--experiment to start another')
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._setup_logging()
        seed_everything(args.seed)
        self._build_data()
        self._build_model()
        self._build_inputs()
        self.history = []

    def _setup_logging(self) -> None:
        handlers = [logging.StreamHandler(sys.stdout)]
        if self.is_main:
            handlers.append(logging.FileHandler(self.out_dir / 'log.txt'))
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format='%(asctime)s %(message)s', datefmt='%H:%M:%S', handlers=handlers, force=True)

    def _build_data(self) -> None:
        a = self.args
        if a.target in a.source:
            raise SystemExit(f'error: the target {a.target!r} is also a source')
        extra = dict(train_size=a.offline_train_size, test_size=a.offline_test_size) \
            if a.dataset == 'offline_digits' else {}
        read = partial(create_domain_datasets, a.dataset, a.data_dir, **extra)
        self.sources = read(a.source, a.source_split)
        self.classes = self.sources[0].classes
        self.target_train, = read([a.target], a.target_train_split, classes=self.classes)
        self.test_sets = {d.domain: d for d in read(a.source + [a.target], a.target_test_split, classes=self.classes)}
        self.uda_cfg = UdaConfig(a.method, a.threshold, a.soft_weighting, a.unlabelled_stream, a.forward_mode,
                                 a.unlabelled_weight)

    def _build_inputs(self) -> None:
        """Transforms from the model's data config (input size, mean, std), samplers and datasets."""
        a = self.args
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        size = a.input_size or data_cfg['input_size'][-1]
        tf = create_uda_transforms(size, data_cfg['mean'], data_cfg['std'], flip=a.flip, translate=a.translate,
                                   rand_augment=a.rand_augment, cutout=a.cutout)
        for ds in self.test_sets.values():
            ds.transform = tf['test']
        cfg = self.uda_cfg
        self.source_train = ConcatDataset([
            TwoViewDataset(ds, tf['weak'], tf['strong']) if cfg.needs_source_strong
            else TransformedDataset(ds, tf['weak'])
            for ds in self.sources])
        self.target_two_view = TwoViewDataset(self.target_train, tf['weak'], tf['strong'])
        self.source_sampler = DomainBalancedSampler([len(d) for d in self.sources], a.batch_size, a.seed,
                                                    self.rank, self.world_size)
        self.steps_per_epoch = len(self.source_sampler)
        self.target_sampler = CyclingBatchSampler(len(self.target_train), a.batch_size, self.steps_per_epoch,
                                                  a.seed + 1, self.rank, self.world_size)
        _logger.info(f'sources {[f"{d.domain}:{len(d)}" for d in self.sources]}, target {a.target}: '
                     f'{len(self.target_train)} unlabelled train / {len(self.test_sets[a.target])} test images, '
                     f'{len(self.classes)} classes, input {size}px, {self.steps_per_epoch} steps per epoch, '
                     f'{self.world_size} process(es)')

    def _build_model(self) -> None:
        a = self.args
        model = create_model(a.model, pretrained=a.pretrained, allow_pickle=a.allow_pickle,
                             num_classes=len(self.classes), **a.model_kwargs)
        if a.init_checkpoint:
            if not Path(a.init_checkpoint).is_file():
                raise SystemExit(f'error: --init-checkpoint {a.init_checkpoint} is not a file')
            load_checkpoint(model, a.init_checkpoint, filter_fn=static_twin_filter_fn)
        if a.mixstyle_after:
            attach_mixstyle(model, a.mixstyle_after, MixStyle())
        if a.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if a.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEmaV3(model, decay=a.ema_decay) if a.ema_decay > 0 else None
        _logger.info(f'model {a.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters')

    def _wrap(self, joint: bool) -> torch.nn.Module:
        wrapped = MultiViewModel(self.model, joint=joint)
        if self.world_size > 1:
            wrapped = torch.nn.parallel.DistributedDataParallel(wrapped)
        if self.args.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _optimizer(self, epochs: int):
        a = self.args
        kwargs = dict(betas=tuple(a.opt_betas)) if a.opt_betas else {}
        groups = uda_param_groups(self.model, a.new_lr_scale, a.weight_decay)
        optimizer = create_optimizer_v2(groups, a.opt, lr=a.lr, weight_decay=a.weight_decay, momentum=a.momentum,
                                        **kwargs)
        scheduler, _ = create_scheduler_v2(optimizer, a.sched, num_epochs=epochs, warmup_epochs=a.warmup_epochs,
                                           min_lr=a.min_lr, updates_per_epoch=self.steps_per_epoch,
                                           step_on_epochs=False)
        scheduler.step_update(0)  # apply lr_scale before the first step
        return optimizer, scheduler

    def _autocast(self):
        if not self.args.amp:
            return None
        dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        return partial(torch.autocast, self.device.type, dtype=dtype)

    def _loaders(self, epoch: int, start_batch: int, with_target: bool):
        a = self.args
        self.source_sampler.set_epoch(epoch, start_batch)
        self.target_sampler.set_epoch(epoch, start_batch)
        common = dict(num_workers=a.workers, worker_init_fn=_seed_worker,
                      pin_memory=self.device.type == 'cuda', persistent_workers=False)
        gen = torch.Generator().manual_seed(a.seed * 7919 + epoch * 31 + self.rank)
        source = DataLoader(self.source_train, batch_sampler=self.source_sampler, generator=gen, **common)
        target = DataLoader(self.target_two_view, batch_sampler=self.target_sampler, generator=gen,
                            **common) if with_target else None
        return source, target

    def evaluate_target(self) -> dict:
        model = self.ema.module if self.ema is not None else self.model
        return evaluate(model, self.test_sets[self.args.target], len(self.classes), self.args.eval_batch_size,
                        self.device, rank=self.rank, world_size=self.world_size)

    def phases(self):
        a = self.args
        phases = []
        if a.source_only_epochs:
            phases.append(('source_only', UdaConfig('source_only'), a.source_only_epochs))
        phases.append((a.method, self.uda_cfg, a.epochs))
        return phases

    def train(self) -> dict:
        a = self.args
        ckpt_dir = self.out_dir / 'checkpoints'
        state = load_last_checkpoint(ckpt_dir, self.model, self.ema) if a.resume else None
        done = state['epoch'] if state else 0
        if state:
            self.history = state['history']
            _logger.info(f'resumed from {ckpt_dir} after epoch {done}')
        elif a.resume:
            _logger.info(f'--resume: no checkpoint in {ckpt_dir} yet, starting from scratch')
        epoch0 = 0
        progress_on = self.is_main and not a.no_progress
        for phase_index, (phase, cfg, epochs) in enumerate(self.phases()):
            phase_end = epoch0 + epochs
            if done >= phase_end:
                epoch0 = phase_end
                continue
            optimizer, scheduler = self._optimizer(epochs)
            if state and state.get('phase') == phase_index and done > epoch0:
                optimizer.load_state_dict(state['optimizer'])
                scheduler.load_state_dict(state['scheduler'])
            wrapped = self._wrap(cfg.forward_mode == 'joint')
            scaler = torch.amp.GradScaler('cuda') if a.amp and self.device.type == 'cuda' else None
            for epoch in range(max(done, epoch0), phase_end):
                seed_everything(a.seed * 1_000_003 + epoch * 101 + self.rank)
                source, target = self._loaders(epoch, 0, cfg.method == 'fixmatch')
                bar = None
                if progress_on:
                    from tqdm import tqdm
                    bar = tqdm(total=self.steps_per_epoch, desc=f'{phase} {epoch + 1}/{phase_end}', leave=False,
                               dynamic_ncols=True)

                def progress(m, bar=bar):
                    bar.update(1)
                    bar.set_postfix({k: f'{v:.3f}' for k, v in m.items()}, refresh=False)

                start = time.time()
                metrics = train_one_epoch(
                    wrapped, cfg, source, target, optimizer, scheduler, epoch, (epoch - epoch0) * self.steps_per_epoch,
                    device=self.device, autocast=self._autocast(), scaler=scaler, clip_grad=a.clip_grad,
                    ema=self.ema, ema_update_offset=epoch * self.steps_per_epoch, world_size=self.world_size,
                    progress=progress if bar else None)
                if bar:
                    bar.close()
                result = self.evaluate_target()
                row = dict(epoch=epoch + 1, phase=phase, target_accuracy=result['accuracy'],
                           lr=optimizer.param_groups[0]['lr'], epoch_seconds=time.time() - start, **metrics)
                self.history.append(row)
                _logger.info(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))
                if self.is_main:
                    save_checkpoint(ckpt_dir, epoch + 1, self.model, dict(
                        phase=phase_index, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        history=self.history, rng=rng_state()), self.ema, keep=a.keep_checkpoints)
                    self._write_summary()
                if self.world_size > 1:
                    torch.distributed.barrier()
            done = epoch0 = phase_end
        return self.finish()

    def _write_summary(self) -> None:
        keys = sorted({k for row in self.history for k in row}, key=lambda k: (k != 'epoch', k != 'phase', k))
        with open(self.out_dir / 'summary.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)

    def finish(self) -> dict:
        a = self.args
        model = self.ema.module if self.ema is not None else self.model
        per_domain = {name: evaluate(model, ds, len(self.classes), a.eval_batch_size, self.device,
                                     rank=self.rank, world_size=self.world_size)
                      for name, ds in self.test_sets.items()}
        if not self.is_main:
            return {}
        source_only = [h for h in self.history if h['phase'] == 'source_only']
        target = per_domain[a.target]
        results = dict(
            model=a.model, architecture=self.model.pretrained_cfg['architecture'], method=a.method, dataset=a.dataset, sources=a.source, target=a.target,
            classes=self.classes, seed=a.seed, epochs=a.epochs, source_only_epochs=a.source_only_epochs,
            transductive=a.target_train_split == a.target_test_split,
            target_accuracy=target['accuracy'],
            source_only_start_target_accuracy=source_only[-1]['target_accuracy'] if source_only else None,
            per_domain_accuracy={d: r['accuracy'] for d, r in per_domain.items()},
            target_per_class_accuracy=dict(zip(self.classes, target['per_class_accuracy'])),
            target_confusion=target['confusion'],
            history=self.history, world_size=self.world_size, evaluated_weights='ema' if self.ema else 'last',
            wall_seconds=sum(h['epoch_seconds'] for h in self.history),
            versions=dict(torch=torch.__version__, timm=timm.__version__, dida_timm=dida_timm.__version__),
            device=str(self.device), hardware=_hardware(self.device),
            command=self.command, selection='last epoch (no model selection on target labels)',
        )
        (self.out_dir / 'results.json').write_text(json.dumps(results, indent=2))
        safetensors.torch.save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
                                    str(self.out_dir / 'model.safetensors'))

        def tsne_features():
            feats, labels = {}, {}
            for name, ds in self.test_sets.items():
                feats[name], labels[name] = extract_features(model, ds, a.tsne_per_domain, device=self.device,
                                                             seed=a.seed)
            return feats, labels

        write_report(self.out_dir, target['confusion'], self.classes,
                     f'{a.model} on {a.target}: {target["accuracy"]:.1f}%', self.history,
                     tsne_features if a.tsne_per_domain else None, a.target, a.seed)
        return results


def _hardware(device: torch.device) -> str:
    import platform
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    cpu = platform.processor() or platform.machine()
    return f'{cpu} CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)'


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    launcher = 'torchrun --nproc_per_node N ' if 'LOCAL_RANK' in os.environ else ''
    command = launcher + shlex.join(['python', 'train/train.py'] + argv)
    try:
        run = Run(args, command)
        if run.is_main:
            (run.out_dir / 'args.yaml').write_text(yaml.safe_dump(vars(args), sort_keys=False))
        results = run.train()
    except NonFiniteLossError as e:
        _logger.error(f'error: {e}')
        return 3
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, ImportError) as e:
        # user mistakes (arguments, data, model names, weights) end with their message, not a stack trace
        print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
        return 2
    if results:
        start = results['source_only_start_target_accuracy']
        print(f"\ntarget {results['target']} test accuracy (%), {results['model']}")
        if results['method'] == 'source_only':
            print(f"| source-only |\n|---|\n| {results['target_accuracy']:.2f} |")
        else:
            print(f"| source-only start | adapted ({results['method']}) |\n|---|---|")
            print(f"| {'n/a' if start is None else f'{start:.2f}'} | {results['target_accuracy']:.2f} |")
        print(f'report, checkpoint and results: {run.out_dir}')
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
