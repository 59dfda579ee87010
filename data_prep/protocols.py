"""How interactions become samples: the filters (every dropped row counted by reason) and the split
protocols, with their settings (``ProtocolConfig``, written to stats.json).

Filters, in this order: rating threshold -> time window -> dropped items (their interactions too) ->
duplicate (user, item) pairs (the earliest one is kept) -> iterative k-core -> protocol minimum (loo
needs 3 interactions per user) -> items left without interactions.

Time order and ties: each user's interactions are ordered by (timestamp, file order). ML-100K has many
interactions of one user in the same second; file order is the only information left, and using it
makes the result deterministic and independent of sort algorithms. (Sources with finer times hand their
rows in exact-time order, so there "file order" breaks ties by the exact time first: data_prep/common.py.)

Protocols (one sample = user, history of earlier item ids oldest first, target item):

- ``loo``: per user the last interaction is the test target, the second-last the valid target, and every
  earlier interaction with at least one item before it is a train target. History = the last
  ``max_history`` items before the target (default 50).
- ``d3`` (D3 / BIGRec / MiniOneRec): every interaction with at least one earlier interaction of its user
  is a target, history = up to ``max_history`` (default 10) earlier items. All samples are sorted by
  (target timestamp, file order of the target interaction) and cut by position: the first
  ``floor(0.8 N)`` are train, the next ``floor(0.9 N) - floor(0.8 N)`` valid, the rest test — D3's own
  cut. Ties at a boundary: samples sharing the boundary second are split by file order, so a valid
  (test) target is never earlier than any train (valid) target, but may share its second; stats.json
  counts such boundary ties. A protocol that would leave a split empty stops the run (nothing written).

Nothing here is random; ``seed`` is recorded in stats.json only so that a future random protocol has a
place for it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from data_prep.parsing import DataPrepError, date_to_seconds

Protocol = Literal["d3", "loo"]
SPLITS = ("train", "valid", "test")
DEFAULT_MAX_HISTORY = {"d3": 10, "loo": 50}
D3_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class ProtocolConfig:
    """How samples are cut; every field is written to stats.json."""

    name: Protocol = "d3"
    max_history: int | None = None  # None -> DEFAULT_MAX_HISTORY[name]
    min_rating: float | None = None  # None -> every rating is an interaction
    k_core: int = 0  # 0 -> no k-core filter
    start: str | None = None  # inclusive, "YYYY-MM-DD" (UTC)
    end: str | None = None  # exclusive, "YYYY-MM-DD" (UTC)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DEFAULT_MAX_HISTORY:
            raise DataPrepError(f"--protocol must be one of {sorted(DEFAULT_MAX_HISTORY)}, got {self.name!r}")
        if self.max_history is None:
            self.max_history = DEFAULT_MAX_HISTORY[self.name]
        if self.max_history < 1:
            raise DataPrepError(f"--max-history must be >= 1, got {self.max_history}")
        if self.k_core < 0:
            raise DataPrepError(f"--k-core must be >= 0, got {self.k_core}")
        if self.min_rating is not None and not math.isfinite(self.min_rating):
            raise DataPrepError(f"--min-rating must be a finite number, got {self.min_rating}")

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "max_history", "min_rating", "k_core", "start", "end")}
        d["seed"] = self.seed
        d["tie_break"] = "per user: (timestamp, file order); d3 global order: (target timestamp, file order)"
        if self.name == "d3":
            d["split_fractions"] = list(D3_FRACTIONS)
            d["split_rule"] = "position cut floor(0.8N), floor(0.9N) of the time-sorted samples (D3)"
        else:
            d["split_rule"] = "per user: last = test, second-last = valid, earlier (history >= 1) = train"
        return d


@dataclass
class Drops:
    """Counts of dropped rows by reason; every row that does not reach the output is counted once.

    ``lines``: raw lines skipped before they became rows (blank lines, missing ids: ``reason:file``);
    ``values``: values that could not be used and were left empty (the row itself is kept).
    """

    interactions: Counter = field(default_factory=Counter)
    items: Counter = field(default_factory=Counter)
    lines: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            k: dict(sorted(getattr(self, k).items())) for k in ("lines", "items", "interactions", "values")
        }


# ----------------------------------------------------------------------------- filtering


def _k_core(inter: pd.DataFrame, k: int, drops: Drops) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than k interactions until none is left."""
    while True:
        user_n = inter.groupby("raw_user_id")["raw_item_id"].transform("size")
        item_n = inter.groupby("raw_item_id")["raw_user_id"].transform("size")
        keep = (user_n >= k) & (item_n >= k)
        if keep.all():
            return inter
        drops.interactions[f"{k}_core"] += int((~keep).sum())
        inter = inter[keep]


def filter_interactions(
    items: pd.DataFrame, inter: pd.DataFrame, cfg: ProtocolConfig, drops: Drops
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply the filters listed in the module docstring; return (kept items, kept interactions)."""
    inter = inter.copy()
    inter["order"] = np.arange(len(inter), dtype=np.int64)
    if cfg.min_rating is not None:
        if "rating" not in inter:
            raise DataPrepError("--min-rating was given but this source has no ratings")
        low = inter["rating"] < cfg.min_rating
        drops.interactions["below_min_rating"] += int(low.sum())
        inter = inter[~low]
    if cfg.start is not None or cfg.end is not None:
        lo = date_to_seconds(cfg.start, "--start") if cfg.start else -(2**62)
        hi = date_to_seconds(cfg.end, "--end") if cfg.end else 2**62
        out = (inter["timestamp"] < lo) | (inter["timestamp"] >= hi)
        drops.interactions["out_of_window"] += int(out.sum())
        inter = inter[~out]
    # Items the source dropped (missing / html / long title ...) take their interactions with them.
    reason = items.set_index("raw_item_id")["drop_reason"]
    r = inter["raw_item_id"].map(reason)
    for why, n in r.dropna().value_counts().sort_index().items():
        drops.interactions[why] += int(n)
    inter = inter[r.isna()]
    dup = inter.sort_values(["timestamp", "order"], kind="stable").duplicated(["raw_user_id", "raw_item_id"])
    drops.interactions["duplicate"] += int(dup.sum())
    inter = inter.drop(index=dup[dup].index)
    if cfg.k_core > 0:
        inter = _k_core(inter, cfg.k_core, drops)
    if cfg.name == "loo":  # one train/valid/test target each needs >= 3 interactions
        short = inter.groupby("raw_user_id")["raw_item_id"].transform("size") < 3
        drops.interactions["loo_user_under_3"] += int(short.sum())
        inter = inter[~short]
    for why, n in items["drop_reason"].dropna().value_counts().sort_index().items():
        drops.items[why] += int(n)
    kept = items[items["drop_reason"].isna()]
    used = kept["raw_item_id"].isin(set(inter["raw_item_id"]))
    drops.items["no_interactions_left"] += int((~used).sum())
    drops.interactions = +drops.interactions  # remove zero counts
    drops.items = +drops.items
    return kept[used], inter.sort_values("order", kind="stable")


# ----------------------------------------------------------------------------- protocols


def make_samples(inter: pd.DataFrame, cfg: ProtocolConfig) -> pd.DataFrame:
    """Cut samples from dense interactions (user_id, item_id, timestamp, order); see module docstring."""
    inter = inter.sort_values(["user_id", "timestamp", "order"], kind="stable")
    users = inter["user_id"].to_numpy()
    items = inter["item_id"].to_numpy()
    times = inter["timestamp"].to_numpy()
    orders = inter["order"].to_numpy()
    rows: list[tuple] = []
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    h = cfg.max_history
    for s, e in zip(starts, ends):
        n = e - s
        for j in range(1, n):  # target index within the user; >= 1 item of history
            if cfg.name == "loo":
                split = "test" if j == n - 1 else "valid" if j == n - 2 else "train"
            else:
                split = ""
            hist = items[s + max(0, j - h) : s + j].tolist()
            rows.append(
                (int(users[s]), hist, int(items[s + j]), int(times[s + j]), split, int(orders[s + j]))
            )
    df = pd.DataFrame(rows, columns=["user_id", "history", "target", "target_timestamp", "split", "order"])
    if cfg.name == "d3":
        df = df.sort_values(["target_timestamp", "order"], kind="stable").reset_index(drop=True)
        n = len(df)
        a, b = math.floor(D3_FRACTIONS[0] * n), math.floor((D3_FRACTIONS[0] + D3_FRACTIONS[1]) * n)
        df["split"] = np.where(np.arange(n) < a, "train", np.where(np.arange(n) < b, "valid", "test"))
    return df


def boundary_ties(samples: pd.DataFrame) -> dict:
    """How many samples share their target second with a sample of the previous split (d3 only)."""
    out = {}
    for prev, nxt in (("train", "valid"), ("valid", "test")):
        a = samples.loc[samples["split"] == prev, "target_timestamp"]
        b = samples.loc[samples["split"] == nxt, "target_timestamp"]
        out[f"{prev}/{nxt}"] = 0 if a.empty or b.empty else int((b == a.max()).sum() + (a == b.min()).sum())
    return out


def check_samples(samples: pd.DataFrame) -> None:
    """Invariants every protocol must satisfy; a failure here is a bug in this module, not in the data."""
    for hist, target in zip(samples["history"], samples["target"]):
        assert len(hist) >= 1 and target not in hist, "target inside its own history"
