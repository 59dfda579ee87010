"""Read and check a processed dataset; a map-style Dataset of encoded samples.

The only reader of the processed-data contract (items.parquet, samples.parquet; written and described by
`data_prep/common.py`): the data module, both baselines and `iamrec.reproduce` read through here, and
`eval_subset_rows` is the one rule for which valid/test rows an evaluation scores.

Before anything is read, `check_processed` verifies the folder is one data prep run's output: stats.json
must list the sha256 and size of items.parquet and samples.parquet (and of every other file it lists), and
each listed file must match — so a folder that mixes two runs, a file changed or truncated since, or a
folder without stats.json is refused with one sentence naming the file. A check is done once per process
for each (file, inode, mtime, size). Columns are then checked for their types (integer ids and times,
never floats: a float id is refused, not truncated; string titles and splits; list histories) and nulls.

Errors name the file and say what to do. Samples are kept as flat numpy arrays (a history is a slice of
one `values` array), so a dataset of ~100k samples pickles cheaply to workers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from iamrec.data.encoding import PromptEncoder

SPLITS = ("train", "valid", "test")
SAMPLE_COLUMNS = ("user_id", "history", "target", "split")
# The evaluation subset of a split is drawn with `seed + offset`, so valid and test (and train, drawn with
# `seed` itself) get different draws from one `data.seed`.
_EVAL_SEED_OFFSET = {"valid": 1, "test": 2}
RERUN = "re-run its data prep (e.g. `make data-ml100k`)"
# (file, inode, mtime_ns, size, sha256 vouched for) of every file whose hash was verified in this process.
_VERIFIED: set[tuple] = set()


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_processed(data_dir: str | Path) -> Path:
    """The processed-data folder, after checking its files against the sha256 stats.json lists for them.

    Refuses (one sentence naming the file) a folder without a readable stats.json, a stats.json that does
    not vouch for items.parquet and samples.parquet, and any listed file that is missing or differs from
    its recorded size / sha256 (files of different data prep runs, or changed since). Hashing happens once
    per process for each (file, inode, mtime, size).
    """
    path = check_data_dir(data_dir)
    _require(path / "items.parquet")  # an empty or wrong folder: name the first file a person expects
    stats_path = path / "stats.json"
    if not stats_path.is_file():
        raise DataFileError(f"{stats_path} is missing, so the files in {path} cannot be checked; {RERUN}.")
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataFileError(f"{stats_path} cannot be read as JSON ({e}); {RERUN}.") from None
    files = stats.get("files") if isinstance(stats, dict) else None
    outputs = files.get("outputs") if isinstance(files, dict) else None
    if not isinstance(outputs, dict) or not {"items.parquet", "samples.parquet"} <= set(outputs):
        raise DataFileError(
            f"{stats_path} lists no sha256 for items.parquet and samples.parquet, so the files in {path} "
            f"cannot be checked; {RERUN}."
        )
    for name, info in sorted(outputs.items()):
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("sha256"), str)
            and isinstance(info.get("bytes"), int)
        )
        if not ok or Path(name).name != name:
            raise DataFileError(
                f"{stats_path} has a malformed entry for {name!r} under files.outputs; {RERUN}."
            )
        file = _require(path / name)
        st = file.stat()
        key = (str(file.resolve()), st.st_ino, st.st_mtime_ns, st.st_size, info["sha256"])
        if key in _VERIFIED:
            continue
        if st.st_size != info["bytes"] or _sha256(file) != info["sha256"]:
            raise DataFileError(
                f"{file} does not match the sha256 recorded in {stats_path} (the folder mixes files of "
                f"different data prep runs, or the file was changed since); {RERUN}."
            )
        _VERIFIED.add(key)
    return path


def _schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataFileError(f"{path} cannot be read as parquet ({e}); {RERUN}.") from None


def _check_types(path: Path, schema: pa.Schema, want: dict[str, str]) -> None:
    """Column types: 'int' (any integer type, never float), 'str', 'list<int>'; absent columns are skipped."""
    tests = {
        "int": pa.types.is_integer,
        "str": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "list<int>": lambda t: (
            (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
        ),
    }
    for name, kind in want.items():
        if name in schema.names and not tests[kind](schema.field(name).type):
            raise DataFileError(
                f"{path}: column '{name}' is {schema.field(name).type}, expected {kind.replace('int', 'int64')} "
                f"(ids and times are never floats); {RERUN}."
            )


def load_items(data_dir: str | Path) -> pd.DataFrame:
    """items.parquet with `item_id` dense 0..I-1 (sorted) and stripped, non-empty `title`."""
    path = _require(check_processed(data_dir) / "items.parquet")
    schema = _schema(path)
    missing = [c for c in ("item_id", "title") if c not in schema.names]
    if missing:
        raise DataFileError(f"{path} lacks the column(s) {missing}.")
    _check_types(path, schema, {"item_id": "int", "title": "str"})
    try:
        items = pd.read_parquet(path)
    except (pa.ArrowException, OSError) as e:
        raise DataFileError(f"{path} cannot be read as parquet ({e}); {RERUN}.") from None
    if items["item_id"].isna().any():
        raise DataFileError(f"{path}: column 'item_id' has missing values.")
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
    path = _require(check_processed(data_dir) / "samples.parquet")
    schema = _schema(path)
    missing = [c for c in SAMPLE_COLUMNS if c not in schema.names]
    if missing:
        raise DataFileError(f"{path} lacks the column(s) {missing}.")
    types = {
        "user_id": "int",
        "history": "list<int>",
        "target": "int",
        "split": "str",
        "target_timestamp": "int",
    }
    _check_types(path, schema, types)
    read = [c for c in (*SAMPLE_COLUMNS, "target_timestamp") if c in schema.names]
    try:
        table = pq.read_table(path, columns=read)
    except (pa.ArrowException, OSError) as e:
        raise DataFileError(f"{path} cannot be read as parquet ({e}); {RERUN}.") from None
    for name in read:
        if table.column(name).null_count:
            raise DataFileError(f"{path}: column '{name}' has missing values.")
    hist = table.column("history").combine_chunks()
    if hist.flatten().null_count:
        raise DataFileError(f"{path}: column 'history' has missing item ids.")
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
