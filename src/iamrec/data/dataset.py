"""Read and check a processed dataset; a map-style Dataset of encoded samples.

The only reader of the processed-data contract (items.parquet, samples.parquet; written and described by
`data_prep/common.py`): the data module, both baselines and `iamrec.reproduce` read through here, and
`eval_subset_rows` is the one rule for which valid/test rows an evaluation scores.

Errors name the file and say what to do. Samples are kept as flat numpy arrays (a history is a slice of
one `values` array), so a dataset of ~100k samples pickles cheaply to workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from iamrec.data.encoding import PromptEncoder

SPLITS = ("train", "valid", "test")
SAMPLE_COLUMNS = ("user_id", "history", "target", "split")
# The evaluation subset of a split is drawn with `seed + offset`, so valid and test (and train, drawn with
# `seed` itself) get different draws from one `data.seed`.
_EVAL_SEED_OFFSET = {"valid": 1, "test": 2}


class DataFileError(ValueError):
    """A processed data file is missing or does not follow the data contract."""


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataFileError(
            f"{path} is missing; the processed dataset in {path.parent} is incomplete "
            "(re-run its data prep, e.g. `make data-ml100k`)."
        )
    return path


def check_data_dir(data_dir: str | Path) -> Path:
    """The processed-data folder as a Path, or a one-sentence error saying how to make it."""
    path = Path(data_dir)
    if not path.is_dir():
        raise DataFileError(
            f"data_dir '{path}' does not exist; run `make data-ml100k` (or the data prep of your dataset) "
            "or set data.data_dir to a processed dataset folder."
        )
    return path


def load_items(data_dir: str | Path) -> pd.DataFrame:
    """items.parquet with `item_id` dense 0..I-1 (sorted) and stripped, non-empty `title`."""
    path = _require(check_data_dir(data_dir) / "items.parquet")
    items = pd.read_parquet(path)
    missing = [c for c in ("item_id", "title") if c not in items.columns]
    if missing:
        raise DataFileError(f"{path} lacks the column(s) {missing}.")
    if len(items) == 0:
        raise DataFileError(f"{path} has no items.")
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)
    if not np.array_equal(items["item_id"].to_numpy(), np.arange(len(items))):
        raise DataFileError(f"{path}: item_id must be the dense range 0..{len(items) - 1} (one row per id).")
    if items["title"].isna().any():
        bad = int(items.loc[items["title"].isna(), "item_id"].iloc[0])
        raise DataFileError(f"{path}: item_id {bad} has no title.")
    # Surrounding whitespace would change the tokens at piece boundaries; data prep should strip it.
    items["title"] = items["title"].astype(str).str.strip()
    empty = items.index[items["title"] == ""]
    if len(empty):
        raise DataFileError(f"{path}: item_id {int(empty[0])} has an empty title.")
    return items


@dataclass
class Samples:
    """samples.parquet as flat arrays; the history of row r is `values[offsets[r]:offsets[r + 1]]`."""

    user_id: np.ndarray  # (N,) int64
    target: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) object
    offsets: np.ndarray  # (N + 1,) int64
    values: np.ndarray  # (total history items,) int64
    path: Path

    def __len__(self) -> int:
        return len(self.target)

    def history(self, row: int) -> list[int]:
        return self.values[self.offsets[row] : self.offsets[row + 1]].tolist()

    def rows(self, split: str) -> np.ndarray:
        """Row indices of `split`, in file order; an error if there are none."""
        rows = np.flatnonzero(self.split == split)
        if len(rows) == 0:
            raise DataFileError(f"The {split} split of {self.path} is empty; re-run the data prep.")
        return rows

    def frame(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """The samples (or `rows` of them) as a DataFrame: user_id, history (int64 arrays), target, split.

        Without `rows`, row r of the frame is row r of samples.parquet (its `sample_index`).
        """
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        history = [self.values[self.offsets[r] : self.offsets[r + 1]] for r in rows]
        return pd.DataFrame(
            {
                "user_id": self.user_id[rows],
                "history": pd.Series(history, dtype=object),
                "target": self.target[rows],
                "split": self.split[rows],
            }
        )


def load_samples(data_dir: str | Path, num_items: int | None = None) -> Samples:
    """samples.parquet, checked: required columns, known splits, item ids that exist in items.parquet
    (`num_items` items; read from items.parquet when None)."""
    if num_items is None:
        num_items = len(load_items(data_dir))
    path = _require(check_data_dir(data_dir) / "samples.parquet")
    columns = pq.read_schema(path).names
    missing = [c for c in SAMPLE_COLUMNS if c not in columns]
    if missing:
        raise DataFileError(f"{path} lacks the column(s) {missing}.")
    table = pq.read_table(path, columns=list(SAMPLE_COLUMNS))
    for name in SAMPLE_COLUMNS:
        if table.column(name).null_count:
            raise DataFileError(f"{path}: column '{name}' has missing values.")
    hist = table.column("history").combine_chunks()
    offsets = hist.offsets.to_numpy().astype(np.int64)
    values = hist.flatten().to_numpy().astype(np.int64)  # flatten() honours slicing; rebase offsets
    offsets = offsets - offsets[0]
    target = table.column("target").to_numpy().astype(np.int64)
    split = table.column("split").to_numpy(zero_copy_only=False).astype(object)
    unknown = sorted(set(np.unique(split).tolist()) - set(SPLITS))
    if unknown:
        raise DataFileError(f"{path}: unknown split value(s) {unknown}; expected {list(SPLITS)}.")
    for name, ids in (("history", values), ("target", target)):
        bad = ids[(ids < 0) | (ids >= num_items)]
        if len(bad):
            raise DataFileError(
                f"{path}: {name} holds item id {int(bad[0])}, which is not in items.parquet "
                f"(ids 0..{num_items - 1}); the two files come from different data prep runs."
            )
    user_id = table.column("user_id").to_numpy().astype(np.int64)
    return Samples(user_id, target, split, offsets, values, path)


def subset_rows(rows: np.ndarray, max_samples: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of `rows` (kept in file order); all rows when `max_samples` is None.

    Depends only on (rows, max_samples, seed), so it is the same across runs and DDP ranks.
    """
    if max_samples is None or max_samples >= len(rows):
        return rows
    pick = np.random.default_rng(seed).choice(len(rows), size=max_samples, replace=False)
    return rows[np.sort(pick)]


def eval_subset_rows(
    samples: Samples | str | Path, split: str, max_eval_samples: int | None, seed: int
) -> np.ndarray:
    """The rows of samples.parquet an evaluation of `split` scores: a fixed seeded subset of
    `max_eval_samples` of them (all when None), in file order.

    `samples` is a loaded `Samples` or a processed-data folder. Every method evaluated on a split uses
    this (the LLM's data module, SASRec, most-popular through `iamrec.reproduce`), so with the same
    `max_eval_samples` and `seed` they score the same samples.
    """
    if split not in _EVAL_SEED_OFFSET:
        raise ValueError(f"split must be one of {sorted(_EVAL_SEED_OFFSET)}; got {split!r}.")
    if not isinstance(samples, Samples):
        samples = load_samples(samples)
    return subset_rows(samples.rows(split), max_eval_samples, seed + _EVAL_SEED_OFFSET[split])


class SampleDataset(Dataset):
    """Map-style dataset over some rows of samples.parquet, encoded on the fly (cheap list concatenation).

    `__getitem__` returns `input_ids`, `segment_ids` (lists), `prompt_length`, `target`, `user_id` and
    `sample_index` (the row in samples.parquet); `Collator` makes the batch.
    """

    def __init__(self, encoder: PromptEncoder, samples: Samples, rows: np.ndarray) -> None:
        self.encoder, self.samples, self.rows = encoder, samples, np.asarray(rows, dtype=np.int64)
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        target = int(self.samples.target[row])
        enc = self.encoder.encode(self.samples.history(row), target)
        return {
            "input_ids": enc.input_ids,
            "segment_ids": enc.segment_ids,
            "prompt_length": enc.prompt_length,
            "target": target,
            "user_id": int(self.samples.user_id[row]),
            "sample_index": row,
        }

    @property
    def lengths(self) -> list[int]:
        """Token length of every sample after truncation (computed once, without building sequences)."""
        if self._lengths is None:
            s, enc = self.samples, self.encoder
            self._lengths = [enc.length(s.history(int(r)), int(s.target[r])) for r in self.rows]
        return self._lengths
