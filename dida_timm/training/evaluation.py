"""Evaluation on a labelled split: accuracy, per-class accuracy and the confusion matrix, across ranks."""
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ['evaluate', 'extract_features', 'accuracy_from_confusion', 'predict_probs']


def accuracy_from_confusion(confusion: np.ndarray) -> Dict[str, object]:
    """Overall and per-class accuracy (%) from a [true, predicted] confusion matrix."""
    support = confusion.sum(1)
    per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan) * 100
    return dict(
        accuracy=float(np.trace(confusion) / max(confusion.sum(), 1) * 100),
        per_class_accuracy=[None if np.isnan(v) else float(v) for v in per_class],
        support=support.tolist(),
    )


@torch.no_grad()
def evaluate(
        model: nn.Module,
        dataset: Dataset,
        num_classes: int,
        batch_size: int = 256,
        device: torch.device = torch.device('cpu'),
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
) -> Dict[str, object]:
    """Evaluate `model` on a labelled dataset; with several ranks each evaluates a disjoint shard.

    Returns:
        'accuracy' (%), 'per_class_accuracy' (%, None for classes absent from the split), 'support',
        'confusion' ([true][predicted] counts, summed over ranks).
    """
    was_training = model.training
    model.eval()
    shard = Subset(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    # the largest label past num_classes, reduced over the ranks before any raises (one rank raising alone would
    # leave the others waiting in all_reduce)
    past = torch.full((1,), -1, dtype=torch.int64, device=device)
    try:
        for images, labels in DataLoader(shard, batch_size=batch_size, num_workers=num_workers):
            labels = labels.to(device)
            logits = model(images.to(device))
            # a wider output would put predictions past num_classes into the next row of the flat confusion index
            if logits.shape[-1] != num_classes:
                raise ValueError(f'evaluate: the model gives {logits.shape[-1]} class scores, num_classes is '
                                 f'{num_classes}')
            past = torch.maximum(past, torch.where(labels >= num_classes, labels, -1).max(0, keepdim=True).values)
            known = (labels >= 0) & (labels < num_classes)
            confusion += torch.bincount(labels[known] * num_classes + logits.argmax(-1)[known],
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
        if world_size > 1:
            dist.all_reduce(confusion)
            dist.all_reduce(past, op=dist.ReduceOp.MAX)
    finally:
        model.train(was_training)
    if int(past) >= 0:
        raise ValueError(f'evaluate: the dataset has label {int(past)}, past num_classes ({num_classes})')
    confusion = confusion.cpu().numpy()
    return dict(accuracy_from_confusion(confusion), confusion=confusion.tolist())


@torch.no_grad()
def extract_features(
        model: nn.Module,
        dataset: Dataset,
        max_items: Optional[int] = None,
        batch_size: int = 256,
        device: torch.device = torch.device('cpu'),
        seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Pre-logits features (timm `forward_head(pre_logits=True)`) and labels of up to `max_items` images."""
    was_training = model.training
    model.eval()
    indices = np.arange(len(dataset))
    if max_items is not None and len(indices) > max_items:
        indices = np.sort(np.random.default_rng(seed).choice(indices, max_items, replace=False))
    feats, labels = [], []
    for images, y in DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size):
        x = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
        feats.append(x.flatten(1).float().cpu().numpy())
        labels.append(y.numpy())
    model.train(was_training)
    return np.concatenate(feats), np.concatenate(labels)


@torch.no_grad()
def predict_probs(
        model: nn.Module,
        dataset: Dataset,
        batch_size: int = 256,
        device: torch.device = torch.device('cpu'),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs [N, C] (float64, on the CPU) and labels [N] (UNLABELLED where unknown) of a dataset.

    float64: the label-free scores threshold the probabilities, and float32's round a confident image's maximum to
    1.0 (from a logit margin of about 17), tying it with every other such image.
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size):
        probs.append(model(images.to(device)).cpu().double().softmax(-1))  # on the CPU: MPS has no float64
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)
