"""Batch samplers for multi-source domain adaptation (docs/METHOD.md section 3).

Each training step draws an equal share of labelled images from every source domain plus a batch of
unlabelled target images. An epoch lasts until the smallest source domain is used up; the target is cycled
to give exactly one target batch per source step. With several processes (torchrun), every rank takes a
disjoint shard of every domain's permutation, so each rank's batches keep the domain balance.
"""
from typing import Iterator, List, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ['DomainBalancedSampler', 'CyclingBatchSampler']


class _ShardedEpochSampler(Sampler[List[int]]):
    """Seeded per-epoch permutations, sharded across ranks (a resumed run restarts at an epoch boundary)."""

    def __init__(self, seed: int, rank: int, world_size: int):
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutations."""
        self.epoch = epoch

    def _shard(self, size: int, stream: int) -> List[int]:
        """This rank's share of permutation number `stream` of range(size) for the current epoch."""
        seed = self.seed * 1_000_003 + self.epoch * 101 + stream
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()[self.rank::self.world_size]


class DomainBalancedSampler(_ShardedEpochSampler):
    """Batches of `batch_per_domain` indices from each domain of a ConcatDataset, domains in a fixed order.

    Args:
        domain_sizes: Size of each source domain, in ConcatDataset order.
        batch_per_domain: Images per domain in one batch (on this rank).
        seed: Base seed; each (epoch, domain) gets its own permutation.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(
            self,
            domain_sizes: Sequence[int],
            batch_per_domain: int,
            seed: int = 0,
            rank: int = 0,
            world_size: int = 1,
    ):
        if not domain_sizes or min(domain_sizes) < 1:
            raise ValueError(f'every source domain needs images, got sizes {list(domain_sizes)}')
        if batch_per_domain < 1:
            raise ValueError(f'batch_per_domain must be >= 1, got {batch_per_domain}')
        super().__init__(seed, rank, world_size)
        self.domain_sizes = list(domain_sizes)
        self.offsets = [sum(self.domain_sizes[:i]) for i in range(len(self.domain_sizes))]
        self.batch_per_domain = batch_per_domain
        if len(self) == 0:
            raise ValueError(
                f'the smallest source domain ({min(domain_sizes)} images) cannot fill one batch of '
                f'{batch_per_domain} per domain on {world_size} process(es)')

    def __len__(self) -> int:
        return min(self.domain_sizes) // (self.batch_per_domain * self.world_size)

    def __iter__(self) -> Iterator[List[int]]:
        shards = [self._shard(size, d) for d, size in enumerate(self.domain_sizes)]
        b = self.batch_per_domain
        for i in range(len(self)):
            yield [offset + idx for shard, offset in zip(shards, self.offsets) for idx in shard[i * b:(i + 1) * b]]


class CyclingBatchSampler(_ShardedEpochSampler):
    """Exactly `num_batches` batches from one dataset, reshuffled each time it is used up (the target stream).

    Args:
        size: Dataset size.
        batch_size: Images per batch (on this rank).
        num_batches: Batches per epoch (the source sampler's length).
        seed: Base seed.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(self, size: int, batch_size: int, num_batches: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if size < world_size:
            raise ValueError(f'the target domain has {size} images, fewer than {world_size} process(es)')
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        super().__init__(seed, rank, world_size)
        self.size = size
        self.batch_size = batch_size
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[List[int]]:
        stream: List[int] = []
        cycle = 0
        needed = self.num_batches * self.batch_size
        while len(stream) < needed:
            stream += self._shard(self.size, 7919 * (cycle + 1))
            cycle += 1
        for i in range(self.num_batches):
            yield stream[i * self.batch_size:(i + 1) * self.batch_size]
