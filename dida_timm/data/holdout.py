"""Held-out slices for label-free validation: part of each source domain and of the unlabelled target.

A run that adapts without target labels can only judge its checkpoints on images it never trained on: a fixed
slice of the unlabelled target (for the label-free scores) and a slice of each labelled source domain (for the
source validation accuracy and the calibration of the accuracy estimate). The slice depends on the seed only,
so a resumed run holds out the same images.
"""
from typing import Tuple

import numpy as np

from .domain_dataset import DomainDataset

__all__ = ['holdout_split']


def holdout_split(
        dataset: DomainDataset,
        fraction: float,
        max_items: int,
        seed: int,
) -> Tuple[DomainDataset, DomainDataset]:
    """Split a domain into (trained on, held out): `fraction` of its images, at most `max_items`, at least one.

    Args:
        dataset: The domain.
        fraction: Share held out, in (0, 1).
        max_items: Cap on the held-out images (large domains need no more to score a model).
        seed: Seed of the random choice.

    Raises:
        ValueError: if the domain is too small to keep images on both sides.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f'a held-out fraction must be in (0, 1), got {fraction}')
    if max_items < 1:
        raise ValueError(f'max_items must be >= 1, got {max_items}')
    n = len(dataset)
    count = min(max_items, max(1, round(n * fraction)))
    if count >= n:
        if n < 2:
            raise ValueError(f'domain {dataset.domain!r} has {n} image(s): a domain needs 2 or more, one held out for '
                             'validation and the rest trained on')
        raise ValueError(f'domain {dataset.domain!r} has {n} images: holding {count} out for validation leaves none '
                         f'to train on (--target-val-fraction and --source-val-fraction set the shares held out)')
    order = np.random.default_rng(seed).permutation(n)
    return dataset.subset(np.sort(order[count:])), dataset.subset(np.sort(order[:count]))
