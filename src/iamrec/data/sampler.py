"""Length bucketing for training: batches of similar lengths waste less compute on padding.

`LengthGroupedBatchSampler` takes the indices of an inner sampler (a seeded `RandomSampler`, or under DDP
the `DistributedSampler` Lightning injects), cuts them into *mega-batches* of `batch_size *
mega_batch_factor` indices, sorts each mega-batch by length, cuts it into batches and shuffles the batch
order (seeded). Every index of the inner sampler lands in exactly one batch, and the order still changes
from epoch to epoch.

DDP: the class subclasses `BatchSampler` and takes `sampler` as its first argument, so Lightning
(`use_distributed_sampler=True`, the default) re-creates it around a `DistributedSampler`: each rank groups
its own shard, and every rank gets the same number of batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of indices of similar length, in a seeded shuffled order.

    Args:
        sampler: Yields the dataset indices to batch (already shuffled; see module docstring).
        batch_size: Samples per batch.
        drop_last: Drop the one incomplete batch.
        lengths: Token length of every dataset index.
        seed: Seeds the batch order; iteration `e` uses `(seed, e)`.
        mega_batch_factor: Mega-batch size in batches; larger groups lengths tighter, smaller keeps
            more randomness.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] = (),
        seed: int = 0,
        mega_batch_factor: int = 50,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if mega_batch_factor < 1:
            raise ValueError(f"mega_batch_factor must be >= 1, got {mega_batch_factor}.")
        self.lengths = lengths
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the batch order of the next iteration (e.g. when resuming); otherwise it advances by one
        each iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        indices = list(iter(self.sampler))
        mega = self.batch_size * self.mega_batch_factor
        batches: list[list[int]] = []
        for start in range(0, len(indices), mega):
            group = sorted(indices[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches += [group[b : b + self.batch_size] for b in range(0, len(group), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        for j in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[j]
