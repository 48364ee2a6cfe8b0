"""Loading any model spec and predicting on a folder of new-domain images.

    python -m dida_timm.inference --model dida_digitnet_compact.offline_svhn_style --images DIR --output preds.csv

A model spec is a timm name with an optional tag (`dida_resnet18.tv_in1k`), a Hub id (`hf-hub:ORG/NAME`),
`local-dir:PATH`, or a plain path to an exported repo folder (one holding config.json).
"""
import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import timm
import torch
from torch.utils.data import DataLoader

from .data import read_unlabelled_folder
from .models.factory import create_model  # re-exported: it used to live here

__all__ = ['create_model', 'load_model', 'predict_images', 'main']


def load_model(spec: str, device: str = 'cpu', allow_pickle: bool = False, **kwargs) -> torch.nn.Module:
    """A pretrained model in eval mode, from any spec `create_model` takes (pickled weights refused by default)."""
    return create_model(spec, pretrained=True, allow_pickle=allow_pickle, **kwargs).eval().to(device)


def label_names(model: torch.nn.Module) -> List[str]:
    names = model.pretrained_cfg.get('label_names')
    return [str(n) for n in names] if names else [str(i) for i in range(model.num_classes)]


@torch.no_grad()
def predict_images(
        model: torch.nn.Module,
        folder: Path,
        batch_size: int = 64,
        topk: int = 1,
        num_workers: int = 0,
        progress: bool = True,
) -> Iterator[Dict[str, object]]:
    """Yield one row per image under `folder`: path, top-k labels and their probabilities."""
    # the evaluation transform of training: resize to the input size, no centre crop
    config = dict(timm.data.resolve_data_config({}, model=model), crop_pct=1.0, crop_mode='squash')
    transform = timm.data.create_transform(**config)
    names = label_names(model)
    dataset = read_unlabelled_folder(folder, Path(folder).name, names, transform)
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc='predicting', unit='batch')
    index = 0
    for images, _ in loader:
        probs = model(images.to(device)).float().softmax(-1)
        top_p, top_i = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        for p_row, i_row in zip(top_p.tolist(), top_i.tolist()):
            row = {'image': str(dataset.paths[index])}
            for rank, (p, i) in enumerate(zip(p_row, i_row), 1):
                row[f'label_{rank}'] = names[i]
                row[f'confidence_{rank}'] = round(p, 6)
            index += 1
            yield row


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='name[.tag], hf-hub:ORG/NAME, local-dir:PATH or a folder')
    parser.add_argument('--images', type=Path, required=True, help='folder of images (searched recursively)')
    parser.add_argument('--output', type=Path, required=True, help='CSV file to write')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--topk', type=int, default=1)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--allow-pickle', action='store_true',
                        help='load a hub / local repo without model.safetensors (unpickles its weights)')
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, args.device, allow_pickle=args.allow_pickle)
        rows = list(predict_images(model, args.images, args.batch_size, args.topk, args.workers))
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f'{len(rows)} predictions written to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
