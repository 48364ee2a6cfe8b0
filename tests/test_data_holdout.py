"""Held-out slices of a domain for label-free validation."""
import numpy as np
import pytest

from dida_timm.data import ArrayDomainDataset, holdout_split


def test_a_cap_below_one_image_is_refused_not_an_empty_slice():
    ds = ArrayDomainDataset('d', ['a'], np.zeros((10, 2, 2, 3), np.uint8), [0] * 10)
    assert [len(part) for part in holdout_split(ds, 0.2, 1, seed=0)] == [9, 1]
    with pytest.raises(ValueError, match='max_items must be >= 1, got 0'):
        holdout_split(ds, 0.2, 0, seed=0)


def test_a_domain_too_small_to_hold_a_slice_out_says_why_and_names_the_options_where_they_help():
    one = ArrayDomainDataset('one', ['a', 'b'], np.zeros((1, 4, 4, 3), np.uint8), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"domain 'one' has 1 image\(s\): a domain needs 2 or more"):
        holdout_split(one, 0.2, 1000, seed=0)
    two = ArrayDomainDataset('two', ['a', 'b'], np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"holding 2 out for validation leaves none to train on \(--target-val-fraction"):
        holdout_split(two, 0.8, 1000, seed=0)
