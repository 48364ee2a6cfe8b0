"""Domain-balanced source batches, the cycled target stream, and the two-view transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

from dida_timm.data import CyclingBatchSampler, DomainBalancedSampler, TwoViewDataset, create_uda_transforms


def _domain_of(index: int, sizes) -> int:
    return int(np.searchsorted(np.cumsum(sizes), index, side='right'))


def test_every_batch_has_an_equal_share_of_each_domain():
    sizes = [10, 25, 7]
    sampler = DomainBalancedSampler(sizes, batch_per_domain=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 // 3
    for batch in batches:
        assert [_domain_of(i, sizes) for i in batch] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_epoch_uses_each_image_at_most_once_and_reshuffles():
    sampler = DomainBalancedSampler([8, 8], batch_per_domain=2, seed=1)
    sampler.set_epoch(0)
    first = [i for b in sampler for i in b]
    assert len(first) == len(set(first)) == 16
    sampler.set_epoch(1)
    assert [i for b in sampler for i in b] != first


def test_ranks_get_disjoint_balanced_shards():
    sizes = [12, 20]
    shards = [list(DomainBalancedSampler(sizes, 2, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 12 // 4
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen))
    for shard in shards:
        for batch in shard:
            assert [_domain_of(i, sizes) for i in batch] == [0, 0, 1, 1]


def test_too_small_source_domain_is_refused():
    with pytest.raises(ValueError, match='cannot fill one batch'):
        DomainBalancedSampler([100, 3], batch_per_domain=4)


def test_an_empty_target_batch_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match='batch_size must be >= 1, got 0'):
        CyclingBatchSampler(size=5, batch_size=0, num_batches=3)


def test_target_stream_cycles_to_match_the_source_epoch():
    sampler = CyclingBatchSampler(size=5, batch_size=4, num_batches=6, seed=0)
    batches = list(sampler)
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    passes = [flat[k:k + 5] for k in range(0, len(flat) - 4, 5)]  # 24 indices: four whole passes
    assert len(passes) == 4 and all(sorted(p) == list(range(5)) for p in passes)  # each a full permutation
    assert len({tuple(p) for p in passes}) > 1  # reshuffled for each pass


def test_two_view_dataset_gives_weak_and_strong_views():
    tf = create_uda_transforms(32, (0.5,) * 3, (0.5,) * 3, flip=False, translate=0, cutout=16)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    weak, strong, label = TwoViewDataset([(img, 4)], tf['weak'], tf['strong'])[0]
    assert weak.shape == strong.shape == (3, 32, 32) and label == 4
    torch.testing.assert_close(weak, tf['test'](img))  # digits: the weak view is the plain image
    assert (strong == 0).all(0).sum() >= 16 * 16  # cutout square
