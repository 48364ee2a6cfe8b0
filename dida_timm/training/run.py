"""One training run of DIDA-Net's recipe: data, model, phases, label-free monitoring, checkpoints, results.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028.

`Run(args).train()` does what train/train.py promises: an optional source-only phase, then FixMatch on the
unlabelled target; after each epoch the target accuracy (where target labels exist) and the label-free scores
(`label_free.LabelFreeMonitor`) join the history, a crash-safe checkpoint is written and the selection rule
keeps its pick; at the end the selected checkpoint is evaluated, saved and reported.
"""
import argparse
import csv
import errno
import json
import hashlib
import logging
import os
import random
import shlex
import sys
import time
import traceback
from dataclasses import asdict
from functools import cached_property, partial
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import yaml
from safetensors import SafetensorError
from timm.data.readers.img_extensions import get_img_extensions
from timm.models import load_checkpoint
from timm.utils import ModelEmaV3
from torch.utils.data import ConcatDataset, DataLoader, Dataset

import dida_timm
from ..data import (
    CyclingBatchSampler, DomainBalancedSampler, FileDomainDataset, TransformedDataset, TwoViewDataset,
    create_domain_datasets, create_uda_transforms, file_suffixes, holdout_split, read_class_folders,
    read_unlabelled_folder, test_data_config)
from ..layers import DidaModule, muted_if_untrained
from ..layers.dida_triton import triton_runs_on
from ..models import static_twin_filter_fn
from ..models.factory import create_model, label_names
from .checkpoint import load_last_checkpoint, replace_file, save_checkpoint, save_weights
from .distributed import broadcast_from_main, init_distributed
from .evaluation import evaluate, extract_features
from .label_free import LabelFreeMonitor
from .loop import MultiViewModel, NonFiniteLossError, train_one_epoch
from .mixstyle import MixStyle, attach_mixstyle
from .options import changed_run_options, create_optimizer, create_scheduler, parse_args
from .param_groups import uda_param_groups
from .report import write_report
from .selection import LABEL_FREE_KEYS, MIN_IMAGES_PER_CLASS, Selection
from .step import UdaConfig

__all__ = ['Run', 'RunError', 'describe_hardware', 'main', 'print_result_table']

_logger = logging.getLogger('train')

# in a run folder: the train.py commands that started and resumed the run, a JSON list; the file a running
# process holds locked
COMMANDS = 'commands.json'
LOCK = '.lock'


class RunError(Exception):
    """A mistake in what the user asked for (data, model, weights, run folder): the run ends with its message."""


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
        self.device, self.rank, self.world_size = init_distributed(args.device, args.dist_timeout)
        self.is_main = self.rank == 0
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # rank 0's clock: ranks reach this line at different times, and each must write to the same folder
        name = args.experiment or '-'.join([
            broadcast_from_main(time.strftime('%Y%m%d-%H%M%S')), args.model.replace('/', '_').replace(':', '_'),
            Path(args.target_dir).resolve().name if args.target_dir else args.target, args.method])
        if not args.experiment:
            # two runs started in the same second (seeds side by side) got one folder and wrote into each other
            name = broadcast_from_main(claim_run_folder(Path(args.output), name) if self.is_main else name)
        self.out_dir = Path(args.output) / name
        self._lock = hold_run_folder(self.out_dir) if self.is_main else None
        try:
            self._open(name, command)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let another process use the run folder (the end of the run; a process that ends lets it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _open(self, name: str, command: str) -> None:
        """Check the run folder against the options, then build the data, the model and the inputs."""
        args = self.args
        saved_args = self.out_dir / 'args.yaml'
        if args.resume and saved_args.is_file():
            try:
                saved = yaml.safe_load(saved_args.read_text())
            except yaml.YAMLError:
                saved = None
            if not isinstance(saved, dict):  # written by a version that could leave it cut short
                raise RunError(f'--resume: {saved_args} does not hold the options the run was started with (a write '
                               f'cut short?): delete it and resume with the command that started the run (the first of '
                               f'{self.out_dir / COMMANDS}, where a newer version started it)')
            changed = changed_run_options(saved, args)
            if changed:
                # the run's name too: a run named by the clock recorded `experiment: ''`
                own = shlex.join(['-c', str(saved_args), '--resume', '--experiment', name])
                raise RunError(f'--resume: the run in {self.out_dir} was started with other options ('
                               f'{"; ".join(changed)}); resume it with its own ({own}), or start another run with '
                               f'--experiment')
        # the commands that started and resumed the run: the first reproduces it
        recorded = self.out_dir / COMMANDS
        self.commands = (json.loads(recorded.read_text()) if args.resume and recorded.is_file() else []) + [command]
        if self.is_main:
            if _holds_a_run(self.out_dir) and not args.resume:
                raise RunError(f'{self.out_dir} already holds a run; pass --resume to continue it or '
                               f'--experiment to start another')
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._setup_logging()
        seed_everything(args.seed)
        try:
            self._build_data()
            self._build_model()
            self._build_inputs()
        except (ValueError, OSError, RuntimeError) as e:
            # everything built here comes from the user's data, model name and weight files: the message is for
            # the user, the traceback goes to log.txt so that a fault of this package stays traceable
            where = ''
            if self.is_main:
                log = self.out_dir / 'log.txt'
                with log.open('a') as f:
                    traceback.print_exc(file=f)
                where = f' (traceback in {log})'
            raise RunError(f'{type(e).__name__}: {e}{where}') from e
        self.history = []

    def _setup_logging(self) -> None:
        handlers = [logging.StreamHandler(sys.stdout)]
        if self.is_main:
            handlers.append(logging.FileHandler(self.out_dir / 'log.txt'))
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format='%(asctime)s %(message)s', datefmt='%H:%M:%S', handlers=handlers, force=True)

    def _build_data(self) -> None:
        a = self.args
        extra = dict(train_size=a.offline_train_size, test_size=a.offline_test_size) \
            if a.dataset == 'offline_digits' else {}
        read = partial(create_domain_datasets, a.dataset, a.data_dir, **extra)
        if a.target_dir:
            self.target_name = Path(a.target_dir).resolve().name
            unused = f' (--target {a.target} not used)' if a.target is not None else ''
            _logger.info(f'target: the unlabelled images under {a.target_dir}{unused}')
        else:
            self.target_name = a.target
        sources = read(a.source, a.source_split)
        self.classes = sources[0].classes
        if len(self.classes) < 2:  # one softmax output is always 1: every accuracy and estimate would read 100%
            raise RunError(f'the source domains {a.source} of --data-dir {a.data_dir} have one class, '
                           f'{self.classes}: a classifier needs two or more')
        if a.target_dir:
            target, unreadable = _without_unreadable(
                read_unlabelled_folder(a.target_dir, self.target_name, self.classes), 'target')
            if unreadable and not len(target):
                raise RunError(f'--target-dir {a.target_dir}: none of its {len(unreadable)} images can be read '
                               f'({unreadable[0][0]}: {unreadable[0][1]})')
            _logger.info(f'target {a.target_dir}: {len(target)} images, {target.skipped} non-image files skipped, '
                         f'{len(unreadable)} unreadable images skipped')
        else:
            target, = read([a.target], a.target_train_split, classes=self.classes)
        try:
            test_sets = read(a.source, a.target_test_split, classes=self.classes)
        except FileNotFoundError as e:  # the user asked for no source split but the training one
            also = '' if a.target_dir else ', as the target is'
            raise FileNotFoundError(f'{e} (the source domains are evaluated on --target-test-split '
                                    f'{a.target_test_split!r}{also}: name a split they have)') from e
        # a class-folder domain without splits is read whole for both: its test accuracy is on images it trained on
        self.sources_tested_on_training_images = [
            s.domain for s, t in zip(sources, test_sets) if _shares_images(s, t, a.source_split == a.target_test_split)]
        evaluated = None
        if a.target_eval_dir:
            # checked now, as the target folder is: a broken image would otherwise end the run at its first
            # evaluation, an epoch later
            evaluated, unreadable = _without_unreadable(read_class_folders(
                a.target_eval_dir, self.target_name, self.classes, allow_missing_classes=True), 'evaluation')
            if unreadable and not len(evaluated):
                raise RunError(f'--target-eval-dir {a.target_eval_dir}: none of its {len(unreadable)} images can be '
                               f'read ({unreadable[0][0]}: {unreadable[0][1]})')
            if unreadable:
                _logger.warning(f'--target-eval-dir {a.target_eval_dir}: {len(unreadable)} unreadable images left '
                                f'out, target accuracy is measured on the other {len(evaluated)}')
            test_sets.append(evaluated)
        elif not a.target_dir:
            test_sets += read([a.target], a.target_test_split, classes=self.classes)
        if a.target_dir:  # folders of the user's own: either may lie inside a labelled source domain
            for option, folder in (('--target-dir', target), ('--target-eval-dir', evaluated)):
                shared = _shared_image(sources, folder, by_content=True)
                if shared:
                    raise RunError(
                        f'{option}: {shared[1]} is also an image of the labelled source domain {shared[0]!r}: the '
                        f'run would train with the labels of its target images; leave {shared[0]!r} out of --source '
                        'or keep the folder out of the source domains')
        for split, datasets in (('train', sources + [target]), ('test', test_sets)):
            for ds in datasets:
                _warn_of_skipped_files(ds, split)
        self.test_sets = {d.domain: d for d in test_sets}
        # what was read, by domain: runs of other data under one --data-dir name are told apart by it (hub export)
        self.data_images = dict(train={d.domain: len(d) for d in sources + [target]},
                                test={d.domain: len(d) for d in test_sets})
        self.target_test = self.test_sets.get(self.target_name)
        self.transductive = _shares_images(target, self.target_test, a.target_train_split == a.target_test_split,
                                           by_content=bool(a.target_eval_dir))
        # held-out slices for the label-free scores: never trained on, fixed by the seed
        val_seed = a.seed * 7 + 3
        self.target_train, self.target_val = holdout_split(target, a.target_val_fraction, a.val_max_images, val_seed)
        enough = MIN_IMAGES_PER_CLASS * len(self.classes)
        if len(self.target_val) < enough and a.method == 'fixmatch' and a.select != 'last':
            _logger.warning(
                f'the held-out target slice has {len(self.target_val)} images, fewer than {enough} '
                f'({MIN_IMAGES_PER_CLASS} per class): its predicted-class counts stray by chance, so the collapse '
                f'guard of --select {a.select} may flag a healthy epoch and ship an earlier one; hold out more '
                f'(--target-val-fraction, --val-max-images) or read the flagged reasons in results.json')
        splits = [holdout_split(ds, a.source_val_fraction, a.val_max_images, val_seed + i + 1)
                  for i, ds in enumerate(sources)]
        for train, val in splits:  # the sampler's own error would count the images after the held-out slice
            if len(train) < a.batch_size * self.world_size:
                raise RunError(
                    f'source domain {train.domain!r} has {len(train) + len(val)} images, {len(val)} of them held out '
                    f'(--source-val-fraction {a.source_val_fraction}): its {len(train)} training images cannot fill '
                    f'one batch of --batch-size {a.batch_size} per domain on {self.world_size} process(es)')
        self.sources = [train for train, _ in splits]
        self.source_val = ConcatDataset([val for _, val in splits])
        # COT's label marginal from every source label: a small held-out slice can miss a class, and COT would
        # then assume the target has none of it
        labels = torch.from_numpy(np.concatenate([ds.targets for ds in sources]))
        self.source_label_share = torch.bincount(labels, minlength=len(self.classes)).double() / len(labels)
        self.uda_cfg = UdaConfig(a.method, a.threshold, a.soft_weighting, a.unlabelled_stream, a.forward_mode,
                                 a.unlabelled_weight, a.pseudo_label_dropout)

    def _build_inputs(self) -> None:
        """Transforms from the model's data config (input size, mean, std), samplers and datasets."""
        a = self.args
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        size = a.input_size or data_cfg['input_size'][-1]
        tf = create_uda_transforms(size, data_cfg['mean'], data_cfg['std'], flip=a.flip, translate=a.translate,
                                   rand_augment=a.rand_augment, cutout=a.cutout)
        self.test_data_config = test_data_config(size, data_cfg['mean'], data_cfg['std'])
        for ds in self.test_sets.values():
            ds.transform = tf['test']
        self.tsne_target = self.target_test or TransformedDataset(self.target_val, tf['test'])
        self.monitor = LabelFreeMonitor(
            self.out_dir, self.is_main, TransformedDataset(self.target_val, tf['test']),
            TransformedDataset(self.source_val, tf['test']), self.source_label_share, a.select, atc_score=a.atc_score,
            # soft weighting trains on every pseudo-label (weighted by its confidence): none is dropped
            pseudo_label_threshold=0.0 if a.soft_weighting else a.threshold, batch_size=a.eval_batch_size,
            device=self.device)
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
        target_test = f'{len(self.target_test)} labelled test images' if self.target_test else 'no target labels'
        _logger.info(f'sources {[f"{d.domain}:{len(d)}" for d in self.sources]} ({len(self.source_val)} held out), '
                     f'target {self.target_name}: {len(self.target_train)} unlabelled train / '
                     f'{len(self.target_val)} held out / {target_test}, '
                     f'{len(self.classes)} classes, input {size}px, {self.steps_per_epoch} steps per epoch, '
                     f'{self.world_size} process(es)')

    def _build_model(self) -> None:
        a = self.args
        model = create_model(a.model, pretrained=a.pretrained, allow_pickle=a.allow_pickle,
                             num_classes=len(self.classes), **a.model_kwargs)
        # timm keeps a pretrained classifier only at its own class count; kept, it must answer these classes
        self.pretrained_head = a.pretrained and model.pretrained_cfg.get('num_classes') == len(self.classes) and \
            head_for_classes(model, self.classes)
        if a.init_checkpoint:
            if not Path(a.init_checkpoint).is_file():
                raise RunError(f'--init-checkpoint {a.init_checkpoint} is not a file')
            try:
                load_checkpoint(model, a.init_checkpoint, filter_fn=static_twin_filter_fn)
            except (SafetensorError, EOFError, RuntimeError, OSError) as e:
                # a corrupt, truncated or unreadable file, or another model's weights: the user's file, not a fault
                # of this package, and safetensors' and torch's errors do not say which option gave it
                raise RunError(f'--init-checkpoint: cannot load {a.init_checkpoint} into {a.model} '
                               f'({type(e).__name__}: {e})') from e
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
        optimizer = create_optimizer(uda_param_groups(self.model, a.new_lr_scale, a.weight_decay), a)
        scheduler = create_scheduler(optimizer, a, epochs, self.steps_per_epoch)
        scheduler.step_update(0)  # apply lr_scale before the first step
        return optimizer, scheduler

    def _autocast(self):
        if not self.args.amp:
            return None
        dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        return partial(torch.autocast, self.device.type, dtype=dtype)

    def _loaders(self, epoch: int, with_target: bool):
        a = self.args
        self.source_sampler.set_epoch(epoch)
        self.target_sampler.set_epoch(epoch)
        common = dict(num_workers=a.workers, worker_init_fn=_seed_worker,
                      pin_memory=self.device.type == 'cuda', persistent_workers=False)
        gen = torch.Generator().manual_seed(a.seed * 7919 + epoch * 31 + self.rank)
        source = DataLoader(self.source_train, batch_sampler=self.source_sampler, generator=gen, **common)
        target = DataLoader(self.target_two_view, batch_sampler=self.target_sampler, generator=gen,
                            **common) if with_target else None
        return source, target

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """The weights every score and export uses: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def epoch_row(self, epoch: int, phase: str, model: Optional[torch.nn.Module] = None) -> dict:
        """Target accuracy (when target labels exist) and label-free scores of the model after `epoch`.

        Args:
            epoch: Epochs trained.
            phase: The phase name the row records.
            model: The model to score, default `evaluated_model`.
        """
        model = model if model is not None else self.evaluated_model
        row = dict(epoch=epoch, phase=phase)
        if self.target_test is not None:
            row['target_accuracy'] = evaluate(
                model, self.target_test, len(self.classes), self.args.eval_batch_size, self.device,
                rank=self.rank, world_size=self.world_size)['accuracy']
        row.update(self.monitor.score(model, epoch))
        return row

    @cached_property
    def resumable(self) -> Dict[str, Any]:
        """What a resumed run must find as the run left it, beyond its options: the processes and steps per epoch
        its schedule counted, and the target and source images held out for the label-free scores (folders may
        change: an image added to a domain draws its held-out slice anew, among images trained on). Fixed once the
        inputs are built: computed once, saved with every checkpoint."""
        a = self.args
        return dict(world_size=self.world_size, steps_per_epoch=self.steps_per_epoch,
                    target_held_out=_fingerprint([self.target_val], a.target_dir or a.data_dir),
                    source_held_out=_fingerprint(self.source_val.datasets, a.data_dir))

    def _check_resumable(self, saved: Dict[str, Any]) -> None:
        """Refuse a resume whose processes, steps per epoch or held-out target images differ from the run's."""
        now = self.resumable
        why = dict(
            world_size=f'it ran on {saved.get("world_size")} process(es), now on {now["world_size"]}: resume it on '
                       f'as many (its schedule and batches count per process)',
            steps_per_epoch=f'its epochs had {saved.get("steps_per_epoch")} steps, now {now["steps_per_epoch"]}: '
                            f'the source images changed',
            target_held_out=f'the target images held out for its label-free scores changed (images added to or '
                            f'removed from {self.args.target_dir or "the target"}?)',
            source_held_out='the source images held out for its label-free scores changed (images added to or '
                            'removed from a source domain?)')
        changed = [why[k] for k in why if k in saved and saved[k] != now[k]]
        if changed:
            raise RunError(f'--resume: the run in {self.out_dir} cannot continue here; ' + '; '.join(changed))

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
        try:
            state = load_last_checkpoint(ckpt_dir, self.model, self.ema) if a.resume else None
        except OSError as e:
            raise RunError(f'--resume: {e}') from e
        done = state['epoch'] if state else 0
        if state:
            self._check_resumable(state.get('resumable', {}))
            self.history = state['history']
            _logger.info(f'resumed from {ckpt_dir} after epoch {done}')
        elif a.resume:
            _logger.info(f'--resume: no checkpoint in {ckpt_dir} yet, starting from scratch')
        if self.is_main:  # a start that goes on (a refused resume leaves the run's record as it was)
            self.record_start()
        epoch0 = 0
        progress_on = self.is_main and not a.no_progress and sys.stderr.isatty()
        for phase_index, (phase, cfg, epochs) in enumerate(self.phases()):
            phase_end = epoch0 + epochs
            if cfg.method == 'fixmatch':  # also for a finished phase: the final selection needs the reference
                self._start_adaptation(epoch0, done)
            if done >= phase_end:
                epoch0 = phase_end
                continue
            optimizer, scheduler = self._optimizer(epochs)
            scaler = torch.amp.GradScaler('cuda') if a.amp and self.device.type == 'cuda' else None
            if state and state.get('phase') == phase_index and done > epoch0:
                optimizer.load_state_dict(state['optimizer'])
                scheduler.load_state_dict(state['scheduler'])
                if scaler is not None and state.get('scaler'):  # the loss scale it had found, not 65536 again
                    scaler.load_state_dict(state['scaler'])
            wrapped = self._wrap(cfg.forward_mode == 'joint')
            for epoch in range(max(done, epoch0), phase_end):
                seed_everything(a.seed * 1_000_003 + epoch * 101 + self.rank)
                source, target = self._loaders(epoch, cfg.method == 'fixmatch')
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
                row = self.epoch_row(epoch + 1, phase)
                row.update(epoch_seconds=time.time() - start, **metrics)
                self.history.append(row)
                _logger.info(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))
                if self.is_main:
                    save_checkpoint(ckpt_dir, epoch + 1, self.model, dict(
                        phase=phase_index, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None, history=self.history,
                        resumable=self.resumable), self.ema, keep=a.keep_checkpoints)
                    self._write_summary()
                if cfg.method == 'fixmatch':
                    # after the checkpoint, so that the kept weights never run ahead of the history a resume restores
                    selection = self.monitor.update(self.evaluated_model, self.history)
                    for reason in selection.flagged.get(epoch + 1, []):
                        _logger.info(f'collapse guard flags epoch {epoch + 1}: {reason}')
                if self.world_size > 1:
                    torch.distributed.barrier()
            done = epoch0 = phase_end
        return self.finish()

    def _start_adaptation(self, epoch0: int, done: int) -> None:
        """Fix the reference of the label-free scores: the model as adaptation starts (after `epoch0` epochs)."""
        if done > epoch0:  # resumed inside the adaptation phase: its start is on disk
            self.monitor.restore_reference(epoch0)
            # killed between the last checkpoint and the selection's write: the checkpoint's weights are loaded
            self.monitor.update(self.evaluated_model, self.history)
            return
        reference = self.evaluated_model
        rows = [h for h in self.history if h['epoch'] == epoch0]
        if rows:
            row = rows[0]
        else:  # no source-only phase: score the starting weights as epoch 0
            a = self.args
            trained_head = a.init_checkpoint or self.pretrained_head
            muted = muted_if_untrained(reference) if trained_head else None
            if muted is not None:
                # trained static weights with a fresh branch: the source-only model is the static network
                reference = muted
                _logger.info('no source-only phase and an untrained DIDA branch: the label-free reference (epoch '
                             f'{epoch0}, a candidate of --select) is the static network inside, its branch muted')
            elif a.select != 'last':
                _logger.warning(
                    f'no source-only phase: the label-free reference, which --select {a.select} compares '
                    'every epoch with and falls back to, is the model as loaded. If it is untrained or has new layers '
                    '(a resized classifier) that reference is untrained and the collapse guard misfires: train a '
                    'source-only phase first (--source-only-epochs) or use --select last')
            row = self.epoch_row(epoch0, 'start' if muted is None else 'static_start', reference)
            self.history.append(row)
        self.monitor.set_reference(reference, epoch0, row)
        _logger.info(f'reference for the label-free scores: the model after epoch {epoch0} ({row["phase"]})')

    def record_start(self) -> None:
        """Write the run's options (args.yaml, which a resume compares its own with) and the commands that started
        and resumed it (COMMANDS), once the run is built and any checkpoint it resumes from accepted."""
        options = yaml.safe_dump(vars(self.args), sort_keys=False)
        replace_file(self.out_dir / 'args.yaml', lambda tmp: tmp.write_text(options))
        replace_file(self.out_dir / COMMANDS, lambda tmp: tmp.write_text(json.dumps(self.commands, indent=1)))

    def _write_summary(self, selected_epoch: Optional[int] = None) -> None:
        """Per-epoch history as CSV; at the end, the `selected` column marks the checkpoint the run reports."""
        rows = [dict(h, selected=int(h['epoch'] == selected_epoch)) if selected_epoch is not None else h
                for h in self.history]
        keys = sorted({k for row in rows for k in row}, key=lambda k: (k != 'epoch', k != 'phase', k))

        def write(path: Path) -> None:
            with open(path, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
        replace_file(self.out_dir / 'summary.csv', write)

    def select(self) -> Selection:
        """The checkpoint this run reports, exports and ships (a source-only run: its last epoch)."""
        if self.args.method != 'fixmatch':
            return Selection('last', self.history[-1]['epoch'], 'a source-only run reports its last epoch')
        return self.monitor.select(self.history)

    def finish(self) -> dict:
        a = self.args
        model = self.evaluated_model
        selection = self.select()
        if self.world_size > 1:
            torch.distributed.barrier()  # rank 0 has written the kept weights
        if selection.epoch != self.history[-1]['epoch']:
            model.load_state_dict(self.monitor.selected_weights(selection))
        if selection.guard_fired:
            _logger.warning(f'collapse guard fired: the last epoch is flagged (flagged epochs '
                            f'{sorted(selection.flagged)}); {selection.reason}')
        per_domain = {name: evaluate(model, ds, len(self.classes), a.eval_batch_size, self.device,
                                     rank=self.rank, world_size=self.world_size)
                      for name, ds in self.test_sets.items()}
        if not self.is_main:
            return {}
        chosen = next(h for h in self.history if h['epoch'] == selection.epoch)
        # the source-only model adaptation started from: the last source-only epoch, or without that phase a trained
        # static twin's network with its branch muted (the model as loaded may be untrained: not reported as such)
        source_only = [h for h in self.history if h['phase'] in ('source_only', 'static_start')]
        target = per_domain.get(self.target_name)
        results = dict(
            model=a.model, architecture=self.model.pretrained_cfg['architecture'], method=a.method,
            dataset=a.dataset, sources=a.source, target=self.target_name, target_dir=a.target_dir or None,
            target_labelled=target is not None, classes=self.classes, data_images=self.data_images, seed=a.seed,
            epochs=a.epochs,
            source_only_epochs=a.source_only_epochs,
            transductive=self.transductive,
            target_accuracy=target['accuracy'] if target else None,
            last_target_accuracy=self.history[-1].get('target_accuracy'),
            source_only_start_target_accuracy=source_only[-1].get('target_accuracy') if source_only else None,
            estimated_target_accuracy=chosen.get('estimated_accuracy'),
            cot_estimated_target_accuracy=chosen.get('cot_estimated_accuracy'),
            selection=dict(selection.to_dict(), label_free_scores={
                k: chosen[k] for k in LABEL_FREE_KEYS if k in chosen}),
            label_free=dict(
                atc_score=a.atc_score, atc_threshold=chosen.get('atc_threshold'),
                atc_tie_share=chosen.get('atc_tie_share'),
                temperature=chosen.get('temperature'),
                label_share=self.source_label_share.tolist(),
                target_held_out_images=len(self.target_val), source_held_out_images=len(self.source_val),
                reference_epoch=self.monitor.reference_epoch, guard=asdict(self.monitor.guard)),
            per_domain_accuracy={d: r['accuracy'] for d, r in per_domain.items()},
            sources_tested_on_training_images=self.sources_tested_on_training_images,
            target_per_class_accuracy=dict(zip(self.classes, target['per_class_accuracy'])) if target else None,
            target_confusion=target['confusion'] if target else None,
            history=self.history, world_size=self.world_size, evaluated_weights='ema' if self.ema else 'model',
            wall_seconds=sum(h.get('epoch_seconds', 0.0) for h in self.history),
            versions=dict(torch=torch.__version__, timm=timm.__version__, dida_timm=dida_timm.__version__),
            device=str(self.device), hardware=describe_hardware(self.device),
            # the command that started the run reproduces it (a resume's may name files of the run folder)
            command=self.commands[0], resumed_with=self.commands[1:],
            dida_kernels=_dida_unit_backend(self.model, self.device),
            # what the weights started from and the preprocessing they were trained and evaluated with
            pretrained_weights=_pretrained_name(a.model, self.model) if a.pretrained else None,
            # an export's license follows the weights' (a Hub repo's or a folder's config.json says it, not the name)
            pretrained_license=self.model.pretrained_cfg.get('license') if a.pretrained else None,
            init_checkpoint=a.init_checkpoint or None, test_data_config=self.test_data_config,
            # the arguments that rebuild the network (an export's own, such as dida_reduction, included)
            model_args=timm.models.get_model_args(self.model),
        )
        self._write_summary(selection.epoch)
        save_weights(model, self.out_dir / 'model.safetensors')

        def tsne_features():
            feats, labels = {}, {}
            domains = {name: ds for name, ds in self.test_sets.items() if name != self.target_name}
            domains[self.target_name] = self.tsne_target
            for name, ds in domains.items():
                feats[name], labels[name] = extract_features(model, ds, a.tsne_per_domain, device=self.device,
                                                             seed=a.seed)
            return feats, labels

        write_report(self.out_dir, target['confusion'] if target else None, self.classes,
                     f'{a.model} on {self.target_name}: {target["accuracy"]:.1f}% (epoch {selection.epoch})'
                     if target else '', self.history, tsne_features if a.tsne_per_domain else None,
                     self.target_name, a.seed, selected_epoch=selection.epoch)
        # last, whole or not at all: its presence tells a finished run (bench/uda_runs.py, hub/export.py)
        replace_file(self.out_dir / 'results.json', lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
        return results


def _warn_of_skipped_files(dataset: Dataset, split: str) -> None:
    """Log the files of a domain that its reader left out for their extension (a .bmp or .webp is not read)."""
    skipped = getattr(dataset, 'skipped_paths', [])
    if skipped:
        suffixes = file_suffixes(skipped)
        _logger.warning(f'domain {dataset.domain} ({split}): {len(skipped)} files left out, not having an image '
                        f'extension ({" ".join(sorted(get_img_extensions()))}): suffixes {suffixes}, e.g. {skipped[0]}')


def claim_run_folder(output: Path, name: str) -> str:
    """Create `output/name`, else `output/name-2`, `-3`, ... for one that exists: the name of the folder created,
    which no other process created (the creation is the claim)."""
    output.mkdir(parents=True, exist_ok=True)
    candidate, number = name, 1
    while True:
        try:
            (output / candidate).mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = f'{name}-{number}'


def hold_run_folder(folder: Path) -> Optional[IO]:
    """Create `folder` and lock it for this process (a POSIX lock on its LOCK file, held while the returned file is
    open and not passed to forked children such as loader workers, which may outlive a killed run by seconds; None
    where the system or the file system has no such locks).

    Raises:
        RunError: if another process holds it: two processes writing one run folder overwrite each other's
            checkpoints and results (the same command started twice, or a resume of a run still going).
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, 'a')
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            _logger.warning(f'{folder} cannot be locked ({e.strerror}): nothing stops another train.py from writing '
                            'into it meanwhile')
            return None
        raise RunError(f'{folder} is in use by another train.py process (a run still going, or the same command '
                       f'started twice): wait for it to end, or start another run with --experiment') from e
    return handle


def head_for_classes(model: torch.nn.Module, classes: Sequence[str]) -> bool:
    """Make the classifier `model` was loaded with answer `classes`, in their order, where its weights name their
    own (`label_names`): its rows reordered for the same names in another order, re-made for other names (their
    rows meant other classes: kept, the run would start from, and could fall back to, a head that mislabels every
    image). Returns whether the loaded classifier is kept."""
    if not model.pretrained_cfg.get('label_names'):
        return True
    names = label_names(model)  # a list, or timm's id -> name map
    if names == list(classes):
        return True
    head = model.get_classifier()
    weight, bias = getattr(head, 'weight', None), getattr(head, 'bias', None)
    if sorted(names) == sorted(classes) and weight is not None and weight.shape[0] == len(classes):
        order = [names.index(c) for c in classes]
        with torch.no_grad():
            for param in (weight, bias):
                if param is not None:
                    param.copy_(param[order])
        _logger.info(f'the classifier of the loaded weights lists the classes in another order: its rows reordered '
                     f'to the data\'s ({", ".join(classes)})')
        kept = True
    else:
        model.reset_classifier(len(classes))
        _logger.warning(f'the loaded weights classify {names}, not the data\'s classes {list(classes)}: their '
                        'classifier is re-made (trained from scratch)')
        kept = False
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=list(classes))
    return kept


def _fingerprint(datasets: Sequence[Dataset], root: str) -> str:
    """A short hash of the images of `datasets`: their paths relative to `root` where they read files (the data may
    move), else their sizes."""
    names = []
    for ds in datasets:
        paths = getattr(ds, 'paths', None)
        names += [os.path.relpath(p, root) for p in paths] if paths is not None and root else [str(len(ds))]
    return hashlib.sha1('\n'.join(names).encode()).hexdigest()[:16]


def _holds_a_run(folder: Path) -> bool:
    """Whether `folder` holds anything but what a start that failed before training leaves (its log and the empty
    label-free folders): a corrected command may then use its name again."""
    if not folder.is_dir():
        return False
    left = {p.name: p for p in folder.iterdir()}
    return not (set(left) <= {'log.txt', 'label_free', 'selection', LOCK} and
                all(left[n].is_dir() and not any(left[n].iterdir()) for n in ('label_free', 'selection') if n in left))


def _without_unreadable(dataset: FileDomainDataset, what: str) -> Tuple[FileDomainDataset, List[Tuple[Path, str]]]:
    """`dataset` without the images that cannot be decoded, each logged as skipped, and those images with why."""
    readable, unreadable = dataset.without_unreadable()
    for path, why in unreadable:
        _logger.warning(f'skipping unreadable {what} image {path}: {why}')
    return readable, unreadable


def _shared_image(datasets: List[Dataset], folder: Optional[Dataset],
                  by_content: bool = False) -> Optional[Tuple[str, Path]]:
    """(domain, path) of an image of `datasets` that is also an image of `folder`, where both read files, else None:
    the same file under any name or link (its device and inode), and with `by_content` a copy of it too (the same
    size, then the same bytes: a folder of the user's own may hold copies of images it was built from)."""
    if not isinstance(folder, FileDomainDataset):
        return None
    files, sizes = set(), {}
    for path in folder.paths:
        stat = path.stat()
        files.add((stat.st_dev, stat.st_ino))
        sizes.setdefault(stat.st_size, []).append(path)
    contents: Dict[int, set] = {}  # by size, the digests of the folder's files of that size, made when first asked

    def digest(path: Path) -> bytes:
        return hashlib.sha256(path.read_bytes()).digest()

    for dataset in datasets:
        if isinstance(dataset, FileDomainDataset):
            for path in dataset.paths:
                stat = path.stat()
                if (stat.st_dev, stat.st_ino) in files:
                    return dataset.domain, path
                if by_content and stat.st_size in sizes:
                    if stat.st_size not in contents:
                        contents[stat.st_size] = {digest(other) for other in sizes[stat.st_size]}
                    if digest(path) in contents[stat.st_size]:
                        return dataset.domain, path
    return None


def _shares_images(train: Dataset, test: Optional[Dataset], same_split: bool, by_content: bool = False) -> bool:
    """Whether a domain's evaluated images include images it trained on: by file (`_shared_image`) where both are
    files (a dataset without splits, such as Office-Home's original release or a class-folder domain, reads the same
    folder for both; a --target-eval-dir may overlap --target-dir, or hold copies of its images), else by split
    name."""
    if test is None:
        return False
    if isinstance(train, FileDomainDataset) and isinstance(test, FileDomainDataset):
        return _shared_image([train], test, by_content) is not None
    return same_split


def _pretrained_name(spec: str, model: torch.nn.Module) -> str:
    """The weights --pretrained loaded: a registry name with the tag timm resolved (dida_resnet18 ->
    dida_resnet18.tv_in1k), a folder as `local-dir:` and its absolute path (an export run from another folder must
    not read a relative one as a timm name), Hub ids as given."""
    if ':' not in spec and Path(spec).is_dir():
        return f'local-dir:{Path(spec).resolve()}'
    tag = model.pretrained_cfg.get('tag')
    if ':' in spec or '.' in spec or not tag:
        return spec
    return f'{spec}.{tag}'


def _dida_unit_backend(model: torch.nn.Module, device: torch.device) -> Optional[str]:
    """How the model's DIDA units ran: 'triton' (dida_timm/layers/dida_triton.py), 'eager', or None without units."""
    units = [m for m in model.modules() if isinstance(m, DidaModule)]
    if not units:
        return None
    on_triton = any(m.use_triton for m in units) and triton_runs_on(torch.empty(0, device=device))
    return 'triton' if on_triton else 'eager'


def describe_hardware(device: torch.device) -> str:
    """What runs on `device`, for run records and benchmark headers: the GPU's name, or the CPU and its threads."""
    import platform
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    cpu = platform.processor() or platform.machine()
    return f'{cpu} CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)'


def print_result_table(results: dict) -> None:
    """The run's outcome: source-only start, last epoch, the selected checkpoint and the label-free estimate."""
    def pct(v):
        return 'n/a' if v is None else f'{v:.2f}'
    sel = results['selection']
    labels = 'test accuracy (%)' if results['target_labelled'] else 'no target labels: accuracy unknown'
    print(f"\ntarget {results['target']}, {results['model']}, {labels}")
    print('| source-only start | last epoch | selected | estimated, ATC (label-free) | estimated, COT (label-free) | '
          'selected epoch, rule |')
    print('|---|---|---|---|---|---|')
    print(f"| {pct(results['source_only_start_target_accuracy'])} | {pct(results['last_target_accuracy'])} | "
          f"{pct(results['target_accuracy'])} | {pct(results['estimated_target_accuracy'])} | "
          f"{pct(results.get('cot_estimated_target_accuracy'))} | {sel['epoch']}, {sel['rule']} |")
    print(sel['reason'])
    if sel['guard_fired']:
        print(f"WARNING: the collapse guard fired: it flagged the last epoch (flagged epochs "
              f"{sorted(int(e) for e in sel['flagged'])}), so the run ships epoch {sel['epoch']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """train/train.py: parse the options, run, print the outcome. Exit 0, 2 for a user mistake, 3 for a
    non-finite loss."""
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    # torchrun runs the script itself (`torchrun ... python train.py` would run a script named python)
    launcher = ['python']
    if 'LOCAL_RANK' in os.environ:
        per_node, world = os.environ.get('LOCAL_WORLD_SIZE', 'N'), os.environ.get('WORLD_SIZE', 'N')
        nodes = [f'--nnodes={int(world) // int(per_node)}'] if world.isdigit() and per_node.isdigit() and \
            world != per_node else []
        launcher = ['torchrun'] + nodes + [f'--nproc_per_node={per_node}']
    command = shlex.join(launcher + ['train/train.py'] + argv)
    run = None
    try:
        run = Run(args, command)
        results = run.train()
    except NonFiniteLossError as e:
        _logger.error(f'error: {e}')
        return 3
    except RunError as e:
        # user mistakes (data, model names, weights, run folders) end with their message, not a stack trace
        print(f'error: {e}', file=sys.stderr)
        return 2
    finally:
        if run is not None:
            run.close()
    if results:
        print_result_table(results)
        print(f'report, checkpoint and results: {run.out_dir}')
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0

