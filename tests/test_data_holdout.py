"""Held-out slices of a domain for label-free validation."""
import numpy as np
import pytest

from dida_timm.data import ArrayDomainDataset, holdout_split


def test_a_cap_below_one_image_is_refused_not_an_empty_slice():
    ds = ArrayDomainDataset('d', ['a'], np.zeros((10, 2, 2, 3), np.uint8), [0] * 10)
    assert [len(part) for part in holdout_split(ds, 0.2, 1, seed=0)] == [9, 1]
    with pytest.raises(ValueError, match='max_items must be >= 1, got 0'):
        holdout_split(ds, 0.2, 0, seed=0)
