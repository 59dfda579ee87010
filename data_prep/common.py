"""Shared pieces of every `data_prep.<source>` module: filtering, dense ids, protocols, writing.

Every source module parses its raw files into two frames and hands them to :func:`build_dataset`:

- raw items: ``raw_item_id`` (str), ``title`` (str or None: None means "no usable title"), optional
  text columns, plus ``drop_reason`` (str or None) when the source already decided to drop an item
  (missing / HTML / long title ...).
- raw interactions: ``raw_user_id`` (str), ``raw_item_id`` (str), ``timestamp`` (int64 seconds),
  optional ``rating``; row order = file order (``order`` is added here, 0..N-1).

:func:`build_dataset` then applies, in this order, counting every dropped row by reason:
rating threshold -> time window -> dropped items (their interactions too) -> duplicate (user, item) pairs
(the earliest one is kept) -> iterative k-core -> protocol minimum (loo needs 3 interactions per user) ->
items left without interactions. Dense ids follow the natural order of the raw ids (numeric when all
raw ids are digits, else lexicographic), so ML raw id 1 becomes item 0.

Time order and ties: each user's interactions are ordered by (timestamp, file order). ML-100K has many
interactions of one user in the same second; file order is the only information left, and using it
makes the result deterministic and independent of sort algorithms.

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
  counts such boundary ties.

The processed contract, written to the output folder (read only through ``iamrec.data``)::

    items.parquet         item_id (dense 0..I-1), title (non-empty), raw_item_id[, text columns]
    users.parquet         user_id (dense 0..U-1), raw_user_id
    interactions.parquet  user_id, item_id, timestamp; per user in time order
    samples.parquet       user_id, history (list of item_id, oldest first), target, target_timestamp,
                          split (train / valid / test); a sample's row number is its ``sample_index``
    stats.json            protocol, raw / kept counts, every dropped row by reason, samples per split,
                          sha256 of every input and output file

Nothing here is random; ``seed`` is recorded in stats.json only so that a future random protocol has a
place for it. Parquet files are written without pandas metadata and with fixed options, so a rerun gives
byte-identical files (stats.json stores their sha256).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

Protocol = Literal["d3", "loo"]
SPLITS = ("train", "valid", "test")
DEFAULT_MAX_HISTORY = {"d3": 10, "loo": 50}
D3_FRACTIONS = (0.8, 0.1, 0.1)


class DataPrepError(Exception):
    """A problem with an input file that a person must fix; the message names the file (and line)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path, self.line = path, line
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


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
    """Counts of dropped rows by reason; every row that does not reach the output is counted once."""

    interactions: Counter = field(default_factory=Counter)
    items: Counter = field(default_factory=Counter)
    lines: Counter = field(default_factory=Counter)  # raw lines skipped before parsing (blank lines)

    def as_dict(self) -> dict:
        return {k: dict(sorted(getattr(self, k).items())) for k in ("lines", "items", "interactions")}


# ----------------------------------------------------------------------------- small helpers


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def natural_order(raw_ids: pd.Series) -> list[str]:
    """Unique raw ids sorted numerically when all are digits, else as strings (deterministic)."""
    uniq = pd.unique(raw_ids.astype(str))
    if all(s.isdigit() for s in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def date_to_seconds(date: str, flag: str) -> int:
    try:
        return int(pd.Timestamp(date, tz="UTC").timestamp())
    except ValueError as e:
        raise DataPrepError(f"{flag} must be a date like 2016-10-01, got {date!r}") from e


def iter_lines(path: Path, encoding: str = "utf-8"):
    """Yield (1-based line number, line without newline) of a text file, .gz allowed; undecodable -> error."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding=encoding, newline="") as f:
            for i, line in enumerate(f, 1):
                yield i, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataPrepError(f"not valid {encoding} text ({e.reason})", path) from e
    except (OSError, EOFError) as e:  # e.g. a truncated or fake .gz
        raise DataPrepError(f"cannot read the file ({e})", path) from e


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataPrepError(f"{what} not found", path)
    if path.stat().st_size == 0:
        raise DataPrepError(f"{what} is empty", path)
    return path


def write_parquet(df: pd.DataFrame, path: Path, schema: pa.Schema) -> None:
    """Write with an explicit schema, no pandas metadata and fixed options -> byte-identical reruns."""
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, path, compression="zstd", use_dictionary=True, write_statistics=True)


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


def _boundary_ties(samples: pd.DataFrame) -> dict:
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


# ----------------------------------------------------------------------------- the whole build

ITEM_BASE = [("item_id", pa.int64()), ("title", pa.string()), ("raw_item_id", pa.string())]
USERS_SCHEMA = pa.schema([("user_id", pa.int64()), ("raw_user_id", pa.string())])
INTER_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
SAMPLES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("history", pa.list_(pa.int64())),
        ("target", pa.int64()),
        ("target_timestamp", pa.int64()),
        ("split", pa.string()),
    ]
)


def build_dataset(
    *,
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    cfg: ProtocolConfig,
    output: str | Path,
    input_files: list[Path],
    source: dict,
    drops: Drops | None = None,
    extra_stats: dict | None = None,
) -> dict:
    """Filter, remap, cut samples and write the processed contract (described above); return stats."""
    drops = drops or Drops()
    if "drop_reason" not in items:
        items = items.assign(drop_reason=None)
    raw = {
        "users": int(interactions["raw_user_id"].nunique()),
        "items": int(len(items)),
        "interactions": int(len(interactions)),
    }
    kept_items, inter = filter_interactions(items, interactions, cfg, drops)
    # Self-check: every raw row is either kept or counted under a reason.
    assert raw["interactions"] == len(inter) + sum(drops.interactions.values())
    assert raw["items"] == len(kept_items) + sum(drops.items.values())
    if inter.empty:
        raise DataPrepError("no interactions left after filtering; see the drop counts above", output)

    item_order = natural_order(kept_items["raw_item_id"])
    item_ids = {raw_id: i for i, raw_id in enumerate(item_order)}
    user_order = natural_order(inter["raw_user_id"])
    user_ids = {raw_id: i for i, raw_id in enumerate(user_order)}
    items_out = kept_items.assign(item_id=kept_items["raw_item_id"].map(item_ids).astype("int64"))
    items_out = items_out.sort_values("item_id").reset_index(drop=True)
    text_cols = [c for c in items_out.columns if c not in ("item_id", "title", "raw_item_id", "drop_reason")]
    items_out = items_out[["item_id", "title", "raw_item_id", *text_cols]]
    dense = pd.DataFrame(
        {
            "user_id": inter["raw_user_id"].map(user_ids).astype("int64").to_numpy(),
            "item_id": inter["raw_item_id"].map(item_ids).astype("int64").to_numpy(),
            "timestamp": inter["timestamp"].astype("int64").to_numpy(),
            "order": inter["order"].to_numpy(),
        }
    )
    samples = make_samples(dense, cfg)
    check_samples(samples)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    item_schema = pa.schema(ITEM_BASE + [(c, pa.string()) for c in text_cols])
    write_parquet(items_out, out / "items.parquet", item_schema)
    users_out = pd.DataFrame(
        {"user_id": np.arange(len(user_order), dtype=np.int64), "raw_user_id": user_order}
    )
    write_parquet(users_out, out / "users.parquet", USERS_SCHEMA)
    inter_out = dense.sort_values(["user_id", "timestamp", "order"], kind="stable")
    write_parquet(inter_out[["user_id", "item_id", "timestamp"]], out / "interactions.parquet", INTER_SCHEMA)
    write_parquet(samples.drop(columns="order"), out / "samples.parquet", SAMPLES_SCHEMA)

    hist_len = samples["history"].map(len)
    stats = {
        "source": source,
        "protocol": cfg.as_dict(),
        "raw": raw,
        "filtered": {
            "users": len(user_order),
            "items": len(item_order),
            "interactions": len(inter),
        },
        "dropped": drops.as_dict(),
        "samples": {s: int((samples["split"] == s).sum()) for s in SPLITS} | {"total": len(samples)},
        "avg_history_length": {s: round(float(hist_len[samples["split"] == s].mean()), 4) for s in SPLITS}
        | {"all": round(float(hist_len.mean()), 4)},
        # Titles shared by several items (ML-100K has a few re-listed movies); kept, but reported,
        # because a title trie cannot tell such items apart.
        "duplicate_title_groups": int(
            items_out.loc[items_out["title"].duplicated(keep=False), "title"].nunique()
        ),
    }
    if cfg.name == "d3":
        stats["d3_boundary_ties"] = _boundary_ties(samples)
    stats.update(extra_stats or {})
    stats["files"] = {
        "inputs": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in input_files},
        "outputs": {
            name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
            for name in ("items.parquet", "users.parquet", "interactions.parquet", "samples.parquet")
        },
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return stats


def print_summary(stats: dict, output: str | Path) -> None:
    s, f, r = stats["samples"], stats["filtered"], stats["raw"]
    print(
        f"raw: {r['users']:,} users, {r['items']:,} items, {r['interactions']:,} interactions -> "
        f"kept: {f['users']:,} users, {f['items']:,} items, {f['interactions']:,} interactions"
    )
    print(
        f"samples ({stats['protocol']['name']}): train {s['train']:,}, valid {s['valid']:,}, "
        f"test {s['test']:,}; avg history {stats['avg_history_length']['all']}"
    )
    d = stats["dropped"]
    dropped = ", ".join(
        f"{k} {k2}: {v:,}" for k in ("lines", "items", "interactions") for k2, v in d[k].items()
    )
    print(f"dropped: {dropped or 'nothing'}")
    print(f"wrote {output}/{{items,users,interactions,samples}}.parquet and stats.json")


def run_main(fn, argv=None) -> int:
    """Call fn(argv); turn DataPrepError into one sentence on stderr and exit code 2."""
    try:
        fn(argv)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
