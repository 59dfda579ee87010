"""Most-popular baseline: recommend the same globally most frequent items to every user.

Popularity is counted on **training-time interactions**: for every user, the distinct items that appear in
the histories or targets of that user's ``train`` samples. Counting distinct (user, item) pairs, not
sample rows, matters for the d3 protocol, where every prefix of a user is its own sample and an early item
would otherwise be counted once per later prefix. Items never seen in training get count 0. Items are
ranked by count, descending, ties broken by ascending item_id; the top-K list is the same for every user.

By default nothing is excluded (the target is never in the history under our data contract, and the
LLM methods do not exclude history items either). ``exclude_history=True`` drops each user's history
items from that user's list, matching the option of the same name on SASRec.

Run ``python -m iamrec.baselines.popular --help``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from iamrec.metrics import DEFAULT_KS, RankingMetrics

SPLITS = ("train", "valid", "test")


def processed_file(data_dir: str | Path, name: str) -> Path:
    """Path of one file of a processed dataset, with an error that says how to make it if absent."""
    path = Path(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `{data_dir}` is not a processed dataset (expected items.parquet, "
            "interactions.parquet, samples.parquet). Build it with `python -m data_prep.<source>` or "
            "`make data-ml100k`."
        )
    return path


def read_num_items(data_dir: str | Path) -> int:
    """Catalogue size I from ``items.parquet``; checks that item ids are dense 0..I-1."""
    ids = pd.read_parquet(processed_file(data_dir, "items.parquet"), columns=["item_id"])["item_id"]
    n = len(ids)
    if n == 0 or ids.min() != 0 or ids.max() != n - 1 or ids.nunique() != n:
        raise ValueError(f"{data_dir}/items.parquet: item_id must be dense 0..I-1 (data contract).")
    return n


def read_samples(data_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """``samples.parquet`` (optionally one split), in file order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    df = pd.read_parquet(processed_file(data_dir, "samples.parquet"))
    if split is not None:
        df = df[df["split"] == split].reset_index(drop=True)
    return df


def _pairs(samples: pd.DataFrame) -> pd.DataFrame:
    """(sample_index, item_id) for every history item of every sample; sample_index is the row position."""
    hist = samples["history"].reset_index(drop=True).explode().dropna()
    return pd.DataFrame({"sample": hist.index.to_numpy(), "item_id": hist.to_numpy().astype(np.int64)})


def item_popularity(samples: pd.DataFrame, num_items: int) -> np.ndarray:
    """(I,) number of distinct users with the item among their train samples' histories and targets."""
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    hist = _pairs(train)
    users = train["user_id"].to_numpy()
    pairs = pd.DataFrame(
        {
            "user_id": np.concatenate([users[hist["sample"].to_numpy()], users]),
            "item_id": np.concatenate([hist["item_id"].to_numpy(), train["target"].to_numpy()]),
        }
    ).drop_duplicates()
    return np.bincount(pairs["item_id"].to_numpy(np.int64), minlength=num_items)


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """(I,) item ids by count descending, ties by item_id ascending."""
    # lexsort sorts by the last key first: -count, then item_id.
    return np.lexsort((np.arange(len(counts)), -counts))


def popular_ranks(
    samples: pd.DataFrame, order: np.ndarray, max_k: int, exclude_history: bool = False
) -> np.ndarray:
    """(N,) 0-based rank of each sample's target in its top-``max_k`` popular list, -1 if absent."""
    position = np.empty_like(order)
    position[order] = np.arange(len(order))  # item -> position in the global list
    target_pos = position[samples["target"].to_numpy(np.int64)]  # (N,)
    ranks = target_pos.copy()
    if exclude_history:
        # Every distinct history item ranked above the target moves the target one place up.
        hist = _pairs(samples.reset_index(drop=True)).drop_duplicates()
        above = position[hist["item_id"].to_numpy()] < target_pos[hist["sample"].to_numpy()]
        ranks -= np.bincount(hist["sample"].to_numpy()[above], minlength=len(samples))
    return np.where(ranks < max_k, ranks, -1)


def evaluate_popular(
    processed_dir: str | Path,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    max_users: int | None = None,
    exclude_history: bool = False,
    out_dir: str | Path | None = None,
    sample_indices: Sequence[int] | None = None,
) -> dict[str, float | int]:
    """Score the most-popular baseline on one split of a processed dataset.

    Args:
        processed_dir: folder with the processed dataset (items / samples parquet files).
        split: which samples to evaluate (``valid`` or ``test``).
        ks: the cut-offs K of HR@K / NDCG@K.
        max_users: evaluate only the first N samples of the split (file order), for quick checks.
        exclude_history: drop each user's history items from that user's list.
        out_dir: if given, write ``test_metrics.json`` and ``predictions.parquet`` there (run-directory
            layout read by :mod:`iamrec.results`).
        sample_indices: evaluate exactly these rows of samples.parquet (e.g. the LLM's test subset), so
            the baseline is scored on the same users as the model.

    Returns:
        ``{"HR@K": ..., "NDCG@K": ..., "users": n, "invalid_rate": 0.0}``.
    """
    num_items = read_num_items(processed_dir)
    samples = read_samples(processed_dir)
    order = popularity_order(item_popularity(samples, num_items))
    if sample_indices is not None:
        evaluated = samples.iloc[sorted(int(i) for i in sample_indices)].reset_index(drop=True)
    else:
        evaluated = samples[samples["split"] == split].reset_index(drop=True)
    if max_users is not None:
        evaluated = evaluated.iloc[:max_users]
    metric = RankingMetrics(ks, sync_on_compute=False)  # local data: never sum across ranks
    ranks = popular_ranks(evaluated, order, max(metric.ks), exclude_history)
    metric.update(torch.from_numpy(ranks))
    result = {**metric.compute(), "invalid_rate": 0.0}  # a fixed list never names a non-item
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        pd.DataFrame(
            {"user_id": evaluated["user_id"].to_numpy(), "target": evaluated["target"], "rank": ranks}
        ).to_parquet(out / "predictions.parquet", index=False)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Evaluate the most-popular baseline on a processed dataset and print its metrics."""
    parser = argparse.ArgumentParser(prog="python -m iamrec.baselines.popular", description=__doc__)
    parser.add_argument("processed_dir", help="processed dataset folder, e.g. data/processed/ml-100k")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="cut-offs K")
    parser.add_argument("--max-users", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--exclude-history", action="store_true", help="drop history items per user")
    parser.add_argument("--out", default=None, help="run directory for test_metrics.json/predictions")
    args = parser.parse_args(argv)
    result = evaluate_popular(
        args.processed_dir, args.split, args.ks, args.max_users, args.exclude_history, args.out
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
