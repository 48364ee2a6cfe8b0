"""Loading any model spec and predicting on a folder of new-domain images.

    python -m dida_timm.inference --model dida_digitnet_compact.offline_svhn_style --images DIR --output preds.csv

A model spec is a timm name with an optional tag (`dida_resnet18.tv_in1k`), a Hub id (`hf-hub:ORG/NAME`),
`local-dir:PATH`, or a plain path to an exported repo folder (one holding config.json).
"""
import argparse
import csv
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import timm
import torch
from torch.utils.data import DataLoader, Dataset

from .arguments import at_least, check_options, usable_device
from .data import read_unlabelled_folder
from .data.domain_dataset import READ_ERRORS, read_error_reason
from .models._published import published_folder
# create_model and label_names re-exported: they used to live here
from .models.factory import create_model, label_names, read_hub_config
from .training.selection import (ATC_SCORES, COT_MAX_IMAGES, MIN_IMAGES_PER_CLASS, CollapseGuard, atc_estimate,
                                 cot_estimate, label_free_scores)

__all__ = ['create_model', 'label_free_check', 'label_free_config', 'load_model', 'predict_images',
           'smallest_input_size', 'main']


@torch.no_grad()
def smallest_input_size(model: torch.nn.Module) -> int:
    """The smallest square input size the model can take with its deepest feature map at least one pixel.

    The pretrained config's `min_input_size` where it has one, else the model's total reduction (timm's
    feature_info), else the smallest power of two a forward of one image accepts.
    """
    min_size = (getattr(model, 'pretrained_cfg', None) or {}).get('min_input_size')
    if min_size:
        return int(min_size[-1])
    info = getattr(model, 'feature_info', None)
    reductions = [f['reduction'] for f in info if 'reduction' in f] if info else []
    if reductions:
        return int(max(reductions))
    in_chans = getattr(model, 'in_chans', 3)
    # probe on the model's device and in its dtype (a CPU float32 probe fails on a GPU or half model at every size)
    weight = next(itertools.chain(model.parameters(), model.buffers()), None)
    like = {'device': weight.device, 'dtype': weight.dtype} if weight is not None and weight.is_floating_point() else {}
    was_training = model.training
    model.eval()
    error = None
    try:
        for size in (2 ** i for i in range(11)):
            try:
                model(torch.zeros(1, in_chans, size, size, **like))
                return size
            except RuntimeError as e:
                error = e
    finally:
        model.train(was_training)
    raise ValueError(f'{type(model).__name__} takes no square input of up to 1024 px (the last error below)') from error


def label_free_config(spec: str, num_classes: Optional[int] = None) -> Optional[dict]:
    """The `label_free` section an export wrote into the spec's config.json (the ATC threshold fitted on the
    source domains, the collapse guard and the predicted-class spread the model had on its training target);
    None for a model that has none (e.g. an ImageNet tag).

    Raises:
        ValueError: when the section lacks a value `label_free_check` reads or holds one it cannot use (for a
            model of `num_classes` classes, when given), naming it: an edited config must not end a prediction in
            a traceback, nor give a made-up estimate.
    """
    if Path(spec).is_dir():
        spec = f'local-dir:{Path(spec).resolve()}'
    config = read_hub_config(spec)
    if config is None:
        folder = published_folder(spec)
        config = json.loads((folder / 'config.json').read_text()) if folder else {}
    section = config.get('label_free')
    if section is not None:
        _check_label_free(section, num_classes, f"{spec}'s config.json: label_free")
    return section


def _is_number(value: object) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer past float's range
        return False


def _check_label_free(cfg: object, num_classes: Optional[int], where: str) -> None:
    """Raise a ValueError naming `where` and the value when `cfg` is not a label-free section `label_free_check`
    can use."""
    if not isinstance(cfg, dict):
        raise ValueError(f'{where} must be a mapping, got {type(cfg).__name__}')
    if not _is_number(cfg.get('atc_threshold')):
        raise ValueError(f"{where}.atc_threshold must be a number, got {cfg.get('atc_threshold')!r}")
    if cfg.get('atc_score') not in ATC_SCORES:
        raise ValueError(f"{where}.atc_score must be one of {ATC_SCORES}, got {cfg.get('atc_score')!r}")
    tie_share = cfg.get('atc_tie_share', 1.0)  # exports before 2026-12-05 counted every tie
    if not (_is_number(tie_share) and 0 <= tie_share <= 1):
        raise ValueError(f'{where}.atc_tie_share must be a number in [0, 1], got {tie_share!r}')
    temperature, share = cfg.get('temperature'), cfg.get('label_share')
    if temperature is not None and not (_is_number(temperature) and temperature > 0):
        raise ValueError(f'{where}.temperature must be a positive number, got {temperature!r}')
    if share is not None:
        length = num_classes if num_classes is not None else len(share) if isinstance(share, list) else None
        if not (isinstance(share, list) and len(share) == length and all(_is_number(v) and v >= 0 for v in share)
                and sum(share) > 0):
            raise ValueError(f'{where}.label_share must list {length} non-negative class shares (not all 0), '
                             f'got {share!r}')
    scores = cfg.get('target_scores')
    if scores is not None and not (isinstance(scores, dict) and _is_number(scores.get('effective_classes'))
                                   and _is_number(scores.get('dead_classes'))):
        raise ValueError(f'{where}.target_scores must hold the numbers effective_classes and dead_classes, '
                         f'got {scores!r}')
    guard = cfg.get('guard')
    if guard is not None:
        try:
            CollapseGuard(**guard)
        except TypeError as e:
            raise ValueError(f"{where}.guard must hold CollapseGuard's settings, got {guard!r} ({e})") from e
        bad = {k: v for k, v in guard.items() if not _is_number(v)}
        if bad:
            raise ValueError(f'{where}.guard must hold numbers, got {bad}')


def label_free_check(probs: torch.Tensor, cfg: dict) -> List[str]:
    """Report lines on how the model does on unlabelled images: the COT and ATC accuracy estimates (COT where the
    export carries the temperature and label shares) and the collapse indicators, compared with those the model
    had on its training target's held-out images.

    Args:
        probs: [N, C] softmax outputs on the images.
        cfg: The `label_free` section of the model's config.json.
    """
    scores = label_free_scores(probs)
    lines = []
    with_cot = cfg.get('temperature') is not None and cfg.get('label_share') is not None
    if with_cot:
        # first: on offline-benchmark runs not used to choose it, COT missed by about half ATC's error
        sample = f', on a fixed sample of {COT_MAX_IMAGES}' if len(probs) > COT_MAX_IMAGES else ''
        cot = cot_estimate(probs, torch.tensor(cfg['label_share'], dtype=torch.float64), cfg['temperature'])
        lines.append(f'estimated accuracy by COT on these {len(probs)} images: {cot:.1f}% (predictions at temperature '
                     f'{cfg["temperature"]:.3f}, transported onto labels in the source domains\' class shares{sample})')
    # an export without a tie share fitted its threshold on float32 probabilities (confident ones rounded to 1.0)
    atc_probs = probs if 'atc_tie_share' in cfg else probs.float()
    estimate = atc_estimate(atc_probs, cfg['atc_threshold'], cfg['atc_score'], cfg.get('atc_tie_share', 1.0))
    lines.append(
        f'estimated accuracy by ATC on these {len(probs)} images: {estimate:.1f}% (the share of images whose '
        f'{cfg["atc_score"]} clears {cfg["atc_threshold"]:.4f}, the threshold fitted on the source domains at '
        f'training; a rough guide, see the model card for its measured error)')
    lines += [
        f'predicted classes: {scores["effective_classes"]:.2f} effective of {probs.shape[1]}, '
        f'{scores["dead_classes"]} predicted for < 1% of the images; mean confidence {scores["mean_confidence"]:.3f}',
    ]
    at_training = cfg.get('target_scores')
    enough = MIN_IMAGES_PER_CLASS * probs.shape[1]
    if len(probs) < enough:
        lines.append(f'note: {len(probs)} images are fewer than {enough} ({MIN_IMAGES_PER_CLASS} per class): a healthy '
                     "model's class counts stray from the class shares by chance here, so classes go missing"
                     f"{' and COT reads low' if with_cot else ''}; the "
                     'collapse comparison with the training target is not made')
    elif at_training:
        lines.append(f'on its training target ({cfg.get("target", "held-out images")}) the model had '
                     f'{at_training["effective_classes"]:.2f} effective and {at_training["dead_classes"]} dead classes')
        reasons = CollapseGuard(**cfg['guard']).check(dict(scores), at_training) if cfg.get('guard') else []
        for reason in reasons:
            reason = reason.replace('source-only model', 'model on its training target')
            lines.append(f'WARNING: possible collapse on these images: {reason}')
    return lines


def load_model(spec: str, device: str = 'cpu', allow_pickle: bool = False, **kwargs) -> torch.nn.Module:
    """A pretrained model in eval mode, from any spec `create_model` takes (pickled weights refused by default)."""
    return create_model(spec, pretrained=True, allow_pickle=allow_pickle, **kwargs).eval().to(device)


class _ReadOrReason(Dataset):
    """(image, index, '') for a readable image, (None, index, why) for one that cannot be read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index][0], index, ''
        except READ_ERRORS as e:
            return None, index, read_error_reason(e)


def _collate_readable(items):
    images = [image for image, _, _ in items if image is not None]
    return (torch.stack(images) if images else None, [i for image, i, _ in items if image is not None],
            [(i, why) for image, i, why in items if image is None])


@torch.no_grad()
def predict_images(
        model: torch.nn.Module,
        folder: Path,
        batch_size: int = 64,
        topk: int = 1,
        num_workers: int = 0,
        progress: Optional[bool] = None,
        probabilities: Optional[List[torch.Tensor]] = None,
) -> Iterator[Dict[str, object]]:
    """Yield one row per image under `folder` (any depth): path, top-k labels and their probabilities.

    A file that cannot be read (corrupt, empty, not an image) gets the row {'image': path, 'error': why} and
    the others are predicted. `progress` (default: when stderr is a terminal) shows a bar. When `probabilities`
    is a list, each batch's full softmax output is appended to it, in float64 (for the label-free check).
    """
    # the model's own preprocessing: an export records the evaluation transform of its training run (resize to the
    # input size, no centre crop), any other timm model keeps its crop
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    names = label_names(model)
    dataset = read_unlabelled_folder(folder, Path(folder).name, names, transform)
    weight = next(model.parameters())
    loader = DataLoader(_ReadOrReason(dataset), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_readable)
    for path in dataset.skipped_paths:
        yield {'image': str(path), 'error': 'not an image file (its extension is none of timm\'s image extensions)'}
    if sys.stderr.isatty() if progress is None else progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc='predicting', unit='batch')
    # in train mode batch norm would normalise each batch by its own statistics (predictions depending on the batch
    # size) and move the model's running statistics
    was_training = model.training
    model.eval()
    try:
        yield from _predicted_rows(model, loader, dataset.paths, names, topk, weight, probabilities)
    finally:
        model.train(was_training)


def _predicted_rows(
        model: torch.nn.Module,
        loader: Iterable,
        paths: List[Path],
        names: List[str],
        topk: int,
        weight: torch.Tensor,
        probabilities: Optional[List[torch.Tensor]],
) -> Iterator[Dict[str, object]]:
    """`predict_images`' rows from its loader's batches, on the device and in the dtype of the model's `weight`."""
    for images, indices, unreadable in loader:
        for index, why in unreadable:
            yield {'image': str(paths[index]), 'error': why}
        if images is None:
            continue
        logits = model(images.to(weight.device, weight.dtype))
        probs = logits.float().softmax(-1)
        if probabilities is not None:  # as the run scored them (`predict_probs`)
            probabilities.append(logits.cpu().double().softmax(-1))
        top_p, top_i = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        for index, p_row, i_row in zip(indices, top_p.tolist(), top_i.tolist()):
            row = {'image': str(paths[index])}
            for rank, (p, i) in enumerate(zip(p_row, i_row), 1):
                row[f'label_{rank}'] = names[i]
                row[f'confidence_{rank}'] = round(p, 6)
            yield row


def _write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # an image name that is not valid in the file system's encoding is written back as its own bytes, not refused
    with open(path, 'w', newline='', errors='surrogateescape') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


RULES = [('batch_size', at_least(1)), ('topk', at_least(1)), ('workers', at_least(0)), ('device', usable_device)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Predict every readable image; unreadable ones go to stderr and to <output>_unreadable.csv.

    Exit status: 0 when at least one image was predicted, 1 when none could be read, 2 for a usage error, a model
    that cannot be loaded, a `label_free` section in its config.json that cannot be used, or an output that cannot be
    written.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='name[.tag], hf-hub:ORG/NAME, local-dir:PATH or a folder')
    parser.add_argument('--images', type=Path, required=True, help='folder of images (searched recursively)')
    parser.add_argument('--output', type=Path, required=True,
                        help='CSV file to write; images that cannot be read go to <output>_unreadable.csv')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--topk', type=int, default=1, help='labels per image, at most the model\'s classes')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--allow-pickle', action='store_true',
                        help='load a hub / local repo without model.safetensors (unpickles its weights)')
    args = parser.parse_args(argv)
    check_options(parser, args, RULES)
    if not args.images.is_dir():
        parser.error(f'--images: {args.images} is not a folder')
    if args.output.is_dir():
        parser.error(f'--output: {args.output} is a folder; give the CSV file to write')
    unreadable_file = args.output.with_name(f'{args.output.stem}_unreadable.csv')
    try:  # before any prediction: a folder's worth of work must not end in a file that cannot be written
        args.output.parent.mkdir(parents=True, exist_ok=True)
        for stale in (args.output, unreadable_file):  # an earlier run's, which a failure here must not leave behind
            stale.unlink(missing_ok=True)
        args.output.touch()
        args.output.unlink()
    except OSError as e:
        parser.error(f'--output: cannot write {args.output} ({e.strerror or e})')
    try:
        model = load_model(args.model, args.device, allow_pickle=args.allow_pickle)
        if args.topk > model.num_classes:
            parser.error(f'--topk: {args.topk} is more than the model\'s {model.num_classes} classes')
        check = label_free_config(args.model, model.num_classes)
        probabilities: List[torch.Tensor] = []
        rows = list(predict_images(model, args.images, args.batch_size, args.topk, args.workers,
                                   probabilities=probabilities))
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    predicted = [r for r in rows if 'error' not in r]
    unreadable = [r for r in rows if 'error' in r]
    for r in unreadable:
        print(f"warning: cannot read {r['image']}: {r['error']}", file=sys.stderr)
    try:
        if unreadable:
            _write_csv(unreadable_file, unreadable)
        if predicted:
            _write_csv(args.output, predicted)
    except OSError as e:  # writable at the start, not now (a full disk)
        print(f'error: cannot write the predictions: {e}', file=sys.stderr)
        return 2
    if not predicted:
        print(f'error: none of the {len(rows)} files under {args.images} could be read as an image (listed in '
              f'{unreadable_file})', file=sys.stderr)
        return 1
    print(f'{len(predicted)} predictions written to {args.output}' + (
        f'; {len(unreadable)} unreadable files listed in {unreadable_file}' if unreadable else ''))
    if check:
        print('\n'.join(label_free_check(torch.cat(probabilities), check)))
    else:
        print('no label-free check: the model\'s config.json has no label_free section (not a dida-timm export)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
