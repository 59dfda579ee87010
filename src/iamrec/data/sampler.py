"""The training order: seeded, a function of the epoch alone, and resumable part-way into an epoch.

`SeededRandomSampler` shuffles the dataset with a generator seeded from ``(seed, epoch)``: the order of
epoch `e` does not depend on how many epochs ran before in this process (a `RandomSampler` with a
generator does), so a resumed run can produce it again. Lightning calls its `set_epoch` at every epoch
start, as it does for a `DistributedSampler`.

`ResumableBatchSampler` cuts the inner sampler's indices into consecutive batches; `resume_at=(epoch,
k)` makes its next iteration epoch `epoch` without its first `k` batches, i.e. exactly the batches an
uninterrupted run had left when it saved a checkpoint (`IAMDataModule.state_dict` records the position,
`load_state_dict` hands it back).

`LengthGroupedBatchSampler` (length bucketing: batches of similar lengths waste less compute on padding)
takes the indices of the inner sampler, cuts them into *mega-batches* of `batch_size *
mega_batch_factor` indices, sorts each mega-batch by length, cuts it into batches and shuffles the batch
order (seeded by ``(seed, epoch)``). Every index of the inner sampler lands in exactly one batch, and the
order still changes from epoch to epoch. It resumes like `ResumableBatchSampler`.

The epoch of an iteration is the inner sampler's ``epoch`` when it has one (ours, or the
`DistributedSampler` Lightning injects; Lightning sets it each epoch), else the batch sampler's own
count, which advances by one per iteration (`set_epoch` fixes it).

DDP: both batch samplers subclass `BatchSampler` and take `sampler` as their first argument, so Lightning
(`use_distributed_sampler=True`, the default) re-creates them around a `DistributedSampler` (keeping the
other arguments, `resume_at` and `seed` included): each rank batches its own shard, every rank gets the
same number of batches and skips the same number on resume.

The same order on one and on several devices: Lightning seeds the `DistributedSampler` it injects from
``seed_everything`` and draws epoch `e` from ``seed + e``. The batch sampler reseeds it (`seed`) so that it
draws the permutation `SeededRandomSampler` draws for ``(data.seed, epoch)``; rank `r` of `W` then takes
positions ``r, r + W, ...`` of it, so batch `k` of the `W` ranks (batch size `b` each) holds exactly the
samples of batch `k` of one process with batch size ``W * b``. (Without bucketing; `LengthGroupedBatchSampler`
groups each rank's shard by length, a seeded order of its own.) ``data.seed`` alone fixes the data order;
``seed_everything`` fixes weight initialisation and dropout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, Sampler


class SeededRandomSampler(RandomSampler):
    """A random permutation of the dataset per epoch, from a generator seeded with ``(seed, epoch)``.

    A `RandomSampler` subclass so that Lightning treats it as shuffled (under DDP it swaps it for a shuffled
    `DistributedSampler`). Epoch 0 draws the permutation of ``RandomSampler(generator=manual_seed(seed))``.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s shuffle: `seed` itself for epoch 0, else one mixed from (seed, epoch)
    (torch's CPU generator keeps only 32 bits of a seed, so epochs cannot simply be shifted above them)."""
    if epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint32)[0])


class ResumableBatchSampler(BatchSampler):
    """Consecutive batches of the inner sampler's indices; the next iteration can resume part-way.

    Args:
        sampler: Yields the dataset indices to batch (see the module docstring for its epoch).
        batch_size: Samples per batch.
        drop_last: Drop the one incomplete batch.
        resume_at: ``(epoch, batches_done)``: the next iteration is that epoch, without its first
            `batches_done` batches (None: start at the beginning).
        seed: The shuffle seed (``data.seed``) a shuffling `DistributedSampler` inside is given, so it
            draws `SeededRandomSampler`'s permutation (see the module docstring; None: left as it is).
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        resume_at: tuple[int, int] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.seed = seed
        if resume_at is not None and (len(resume_at) != 2 or min(resume_at) < 0):
            raise ValueError(f"resume_at must be (epoch, batches_done) >= 0, got {resume_at!r}.")
        self.resume_at = tuple(resume_at) if resume_at is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next iteration (and the inner sampler's, when it has one)."""
        self.epoch = epoch
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def current_epoch(self) -> int:
        inner = getattr(self.sampler, "epoch", None)
        return inner if isinstance(inner, int) else self.epoch

    def shard_indices(self, epoch: int) -> list[int]:
        """The inner sampler's indices of `epoch`; a shuffling `DistributedSampler` first reseeded so that
        its generator seed (its ``seed + epoch``) is ``epoch_seed(self.seed, epoch)``."""
        inner = self.sampler
        if self.seed is not None and isinstance(inner, DistributedSampler) and inner.shuffle:
            inner.seed = epoch_seed(self.seed, epoch) - epoch
        return list(iter(inner))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`, in order (the inner sampler is already at `epoch`)."""
        indices = self.shard_indices(epoch)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self.resume_at is not None:
            (epoch, skip), self.resume_at = self.resume_at, None
            self.set_epoch(epoch)
        epoch = self.current_epoch()
        batches = self.epoch_batches(epoch)
        self.epoch = epoch + 1
        yield from batches[skip:]


class LengthGroupedBatchSampler(ResumableBatchSampler):
    """Batches of indices of similar length, in a seeded shuffled order.

    Args:
        sampler: Yields the dataset indices to batch (already shuffled; see module docstring).
        batch_size: Samples per batch.
        drop_last: Drop the one incomplete batch.
        lengths: Token length of every dataset index.
        seed: Seeds the batch order; epoch `e` uses `(seed, e)`.
        mega_batch_factor: Mega-batch size in batches; larger groups lengths tighter, smaller keeps
            more randomness.
        resume_at: As in `ResumableBatchSampler`.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] = (),
        seed: int = 0,
        mega_batch_factor: int = 50,
        resume_at: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last, resume_at, seed)
        if mega_batch_factor < 1:
            raise ValueError(f"mega_batch_factor must be >= 1, got {mega_batch_factor}.")
        self.lengths = lengths
        self.mega_batch_factor = mega_batch_factor

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        indices = self.shard_indices(epoch)
        mega = self.batch_size * self.mega_batch_factor
        batches: list[list[int]] = []
        for start in range(0, len(indices), mega):
            group = sorted(indices[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches += [group[b : b + self.batch_size] for b in range(0, len(group), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
