"""SASRec's data: ``samples.parquet`` of a processed dataset as left-padded history batches
(`SASRecDataModule`), read through iamrec's data layer (`iamrec.data.dataset`) like every method.

Conventions (the model, `iamrec.baselines.sasrec_model`, relies on them):
- **Padding id = I** (``num_items``): item ids stay dense 0..I-1 as in the data contract, the embedding
  table has I+1 rows and the pad row is never scored.
- Histories are **left-padded** to L and truncated to their last L items, so position L-1 always holds
  the most recent item and the prediction for a sample is read there.

Notation: B batch, L = ``max_len`` history positions, I catalogue size.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from iamrec.data.dataset import eval_subset_rows, load_items, load_samples


def left_pad(histories: Sequence[Sequence[int]], max_len: int, pad_id: int) -> np.ndarray:
    """(N, max_len) int64: each history's last ``max_len`` items, right-aligned, ``pad_id`` before."""
    out = np.full((len(histories), max_len), pad_id, dtype=np.int64)
    for row, hist in enumerate(histories):
        hist = np.asarray(hist, dtype=np.int64)[-max_len:]
        if len(hist):
            out[row, max_len - len(hist) :] = hist
    return out


class PaddedSamples(Dataset):
    """Samples as padded tensors; fetched a whole batch at a time through ``__getitems__``.

    ``sample_index`` is each sample's row in samples.parquet (default: 0..N-1 of ``samples``), carried into
    the batches so test predictions name the same rows as the LLM's ``predictions.parquet``.
    """

    def __init__(
        self, samples: pd.DataFrame, max_len: int, pad_id: int, sample_index: np.ndarray | None = None
    ) -> None:
        self.pad_id = pad_id
        rows = np.arange(len(samples)) if sample_index is None else np.asarray(sample_index, dtype=np.int64)
        self.sample_index = torch.from_numpy(rows.astype(np.int64))  # (N,)
        self.user_id = torch.tensor(samples["user_id"].to_numpy(np.int64))  # (N,)
        self.target = torch.tensor(samples["target"].to_numpy(np.int64))  # (N,)
        self.history = torch.from_numpy(left_pad(samples["history"].tolist(), max_len, pad_id))  # (N, L)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        # Batched indexing: one gather per tensor instead of a Python collate over B dicts.
        idx_t = torch.as_tensor(idx)
        history = self.history[idx_t]  # (B, L)
        # Drop the leading columns that are padding in every row (d3 histories hold <= 10 of the 50
        # positions): the model's output is unchanged, since positions count back from the most recent item
        # and pads are masked, and a batch of short histories costs a fifth.
        real = (history != self.pad_id).any(dim=0)  # (L,)
        first = int(real.int().argmax()) if bool(real.any()) else history.shape[1] - 1
        return {
            "sample_index": self.sample_index[idx_t],
            "user_id": self.user_id[idx_t],
            "history": history[:, first:],
            "target": self.target[idx_t],
        }


def _batch_as_is(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    # `PaddedSamples.__getitems__` already returns a batch; module-level so workers can pickle it.
    return batch


class SASRecDataModule(L.LightningDataModule):
    """Serves ``samples.parquet`` of a processed dataset as left-padded history batches for SASRec.

    Batches are dicts: ``history`` (B, max_len) int64 padded with ``num_items``, ``target`` (B,),
    ``user_id`` (B,). Train batches are shuffled (seed with ``lightning.seed_everything``); valid/test
    batches keep file order. ``predict`` serves the test split.

    Args:
        data_dir: processed dataset folder, e.g. ``data/processed/ml-100k``.
        max_len: history positions kept (most recent items); must not exceed the model's ``max_len``.
        batch_size: samples per training batch.
        num_workers: DataLoader worker processes.
        eval_batch_size: samples per valid/test batch (defaults to ``batch_size``).
        max_eval_samples: evaluate on a fixed seeded subset of this many valid/test samples, the rows
            :func:`iamrec.data.eval_subset_rows` picks for every method (same rows for the same ``seed``),
            so SASRec is scored on the same users as the LLM cells (None: all).
        seed: seeds the evaluation subset (the training shuffle follows ``seed_everything``).
        full_validation: validate (and early-stop) on the whole valid split even when
            ``max_eval_samples`` subsets the test split; validation is cheap for SASRec and a few dozen
            users make a noisy stopping signal.
    """

    def __init__(
        self,
        data_dir: str,
        max_len: int = 50,
        batch_size: int = 256,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        full_validation: bool = False,
    ) -> None:
        super().__init__()
        if max_len < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError("SASRecDataModule: need max_len >= 1, batch_size >= 1 and num_workers >= 0.")
        if max_eval_samples is not None and max_eval_samples < 1:
            raise ValueError(f"data.max_eval_samples must be >= 1 or None, got {max_eval_samples}.")
        self.data_dir = data_dir
        self.max_len = max_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_eval_samples, self.seed = max_eval_samples, seed
        self.full_validation = full_validation
        self._num_items: int | None = None
        self.datasets: dict[str, PaddedSamples] = {}

    @property
    def num_items(self) -> int:
        """Catalogue size I, read once from ``items.parquet`` (also the padding id)."""
        if self._num_items is None:
            self._num_items = len(load_items(self.data_dir))
        return self._num_items

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        samples = load_samples(self.data_dir, self.num_items)
        for split in ("train", "valid", "test"):
            if split == "train" or (split == "valid" and self.full_validation):
                rows = samples.rows(split)
            else:
                rows = eval_subset_rows(samples, split, self.max_eval_samples, self.seed)
            part = samples.frame(rows)
            self.datasets[split] = PaddedSamples(part, self.max_len, self.num_items, sample_index=rows)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset, sampler = self.datasets[split], None
        if split != "train" and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default DistributedSampler pads the last shard by repeating samples, which would
            # count some users twice; this one splits the samples exactly (shards differ by at most one
            # batch, safe here because SASRec has no buffers for DDP to sync in evaluation). Lightning
            # keeps a sampler that is already distributed.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_batch_as_is,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
