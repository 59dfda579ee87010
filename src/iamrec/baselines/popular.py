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

from iamrec.data.dataset import load_items, load_samples
from iamrec.metrics import DEFAULT_KS, RankingMetrics
from iamrec.run_folder import write_test_outputs


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


def popular_lists(
    samples: pd.DataFrame, order: np.ndarray, max_k: int, exclude_history: bool = False
) -> list[list[int]]:
    """Each sample's top-``max_k`` list: the global list, less the sample's history items if asked."""
    if not exclude_history:
        return [order[:max_k].tolist()] * len(samples)
    lists = []
    for history in samples["history"]:
        seen = {int(i) for i in history}
        # The first max_k + |history| items always hold max_k items outside the history.
        lists.append([int(i) for i in order[: max_k + len(seen)] if int(i) not in seen][:max_k])
    return lists


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
        out_dir: if given, write ``test_metrics.json`` and ``predictions.parquet`` there (the run-folder
            files of :mod:`iamrec.run_folder`, read by :mod:`iamrec.results`).
        sample_indices: evaluate exactly these rows of samples.parquet (e.g. the LLM's test subset,
            :func:`iamrec.data.eval_subset_rows`), so the baseline is scored on the same users as the model.

    Returns:
        ``{"HR@K": ..., "NDCG@K": ..., "users": n, "invalid_rate": 0.0}``.
    """
    num_items = len(load_items(processed_dir))
    samples = load_samples(processed_dir, num_items).frame()  # row r = sample_index r
    order = popularity_order(item_popularity(samples, num_items))
    if sample_indices is not None:
        rows = np.array(sorted(int(i) for i in sample_indices), dtype=np.int64)
    else:
        rows = np.flatnonzero(samples["split"].to_numpy() == split)
    if max_users is not None:
        rows = rows[:max_users]
    evaluated = samples.iloc[rows].reset_index(drop=True)
    metric = RankingMetrics(ks, sync_on_compute=False)  # local data: never sum across ranks
    ranks = popular_ranks(evaluated, order, max(metric.ks), exclude_history)
    metric.update(torch.from_numpy(ranks))
    result = {**metric.compute(), "invalid_rate": 0.0}  # a fixed list never names a non-item
    if out_dir is not None:
        predictions = pd.DataFrame(
            {
                "sample_index": rows,
                "user_id": evaluated["user_id"].to_numpy(),
                "target": evaluated["target"].to_numpy(),
                "rank": ranks,
                "top_items": popular_lists(evaluated, order, max(metric.ks), exclude_history),
            }
        )
        write_test_outputs(out_dir, result, predictions, method="most-popular")
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
