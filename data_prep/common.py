"""The processed contract every `data_prep.<source>` module writes, and :func:`build_dataset`, which
writes it.

Every source module parses its raw files (strictly: ``data_prep.parsing``) into two frames and hands them
to :func:`build_dataset`:

- raw items: ``raw_item_id`` (str), ``title`` (str or None: None means "no usable title"), optional
  text columns, plus ``drop_reason`` (str or None) when the source already decided to drop an item
  (missing / HTML / long title ...). Every title is put in Unicode NFC here, whatever the source
  (``TITLE_NORMALIZATION``, recorded in stats.json as ``title_normalization``): a title typed in
  decomposed form by a user then finds it (``iamrec.data.histories`` looks titles up in NFC too).
- raw interactions: ``raw_user_id`` (str), ``raw_item_id`` (str), ``timestamp`` (int64 seconds),
  optional ``rating``; row order = file order (``order`` is added here, 0..N-1). A source whose times are
  finer than seconds (milliseconds, ISO-8601 fractions) hands its rows in (exact time, file order) order
  (``data_prep.interactions.in_time_order``), so that ties within a second go by the exact time.

:func:`build_dataset` then filters them, counting every dropped row by reason, and cuts samples by the
chosen protocol (the filters' order, time order and ties, ``loo`` and ``d3``: ``data_prep.protocols``).
Dense ids follow the natural order of the raw ids (numeric when all raw ids are digits, else
lexicographic), so ML raw id 1 becomes item 0.

The processed contract, written to the output folder (read only through ``iamrec.data``)::

    items.parquet         item_id (dense 0..I-1), title (non-empty), raw_item_id[, text columns]
    users.parquet         user_id (dense 0..U-1), raw_user_id
    interactions.parquet  user_id, item_id, timestamp; per user in time order
    samples.parquet       user_id, history (list of item_id, oldest first), target, target_timestamp,
                          split (train / valid / test); a sample's row number is its ``sample_index``
    stats.json            protocol, raw / kept counts, every dropped row by reason, samples per split,
                          title_normalization ("NFC"), sha256 (and size) of every input and output
                          file: the loader checks them

Writing (``data_prep.output``): everything is built in memory first, then the folder is written whole,
under its lock, and swapped in atomically; a reader sees the old folder or the new one, never a mix.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from data_prep.output import (
    STATS_FILE,
    held_output,
    input_record,
    locked_output,
    output_hashes,
    parquet_bytes,
    resolve_output,
    write_output,
)
from data_prep.parsing import DataPrepError
from data_prep.protocols import (
    SPLITS,
    Drops,
    ProtocolConfig,
    boundary_ties,
    check_samples,
    filter_interactions,
    make_samples,
)
from iamrec.errors import OK, guarded

ITEM_BASE = [("item_id", pa.int64()), ("title", pa.string()), ("raw_item_id", pa.string())]
USERS_SCHEMA = pa.schema([("user_id", pa.int64()), ("raw_user_id", pa.string())])
INTER_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
# The Unicode normal form of every written title (stats.json's "title_normalization").
TITLE_NORMALIZATION = "NFC"
SAMPLES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("history", pa.list_(pa.int64())),
        ("target", pa.int64()),
        ("target_timestamp", pa.int64()),
        ("split", pa.string()),
    ]
)


def natural_order(raw_ids: pd.Series) -> list[str]:
    """Unique raw ids sorted numerically when all are digits, else as strings (deterministic)."""
    uniq = pd.unique(raw_ids.astype(str))
    if all(s.isdigit() for s in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


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
    encodings: dict[str, str] | None = None,
) -> dict:
    """Filter, remap, cut samples and write the processed contract (described above); return stats.

    Everything (parquet bytes, stats.json) is built and checked in memory first; the folder is written
    last, atomically (``write_output``), under the output's lock (taken here unless the caller holds it).
    """
    drops = drops or Drops()
    if "drop_reason" not in items:
        items = items.assign(drop_reason=None)
    items = items.assign(title=items["title"].map(_normalize_title))
    raw = {
        "users": int(interactions["raw_user_id"].nunique()),
        "items": int(len(items)),
        "interactions": int(len(interactions)),
    }
    kept_items, inter = filter_interactions(items, interactions, cfg, drops)
    # Self-check: every raw row is either kept or counted under a reason.
    assert raw["interactions"] == len(inter) + sum(drops.interactions.values())
    assert raw["items"] == len(kept_items) + sum(drops.items.values())
    out = resolve_output(output)
    if inter.empty:
        raise DataPrepError(
            f"no interactions left after filtering (dropped: {_dropped_text(drops.as_dict())}); nothing was written",
            out,
        )
    items_out, users_out, dense = _dense_ids(kept_items, inter)
    samples = _samples(dense, cfg, out)
    files = _parquet_files(items_out, users_out, dense, samples)
    stats = {"source": source, "protocol": cfg.as_dict(), "raw": raw}
    stats["title_normalization"] = TITLE_NORMALIZATION
    stats |= _kept_stats(items_out, dense, users_out, samples, cfg, drops)
    stats.update(extra_stats or {})
    encodings = encodings or {}
    stats["files"] = {
        "inputs": {p.name: input_record(p, encodings.get(p.name)) for p in input_files},
        "outputs": output_hashes(files),
    }
    files[STATS_FILE] = (json.dumps(stats, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
    if held_output(out):
        write_output(out, files)
    else:
        with locked_output(out) as locked:
            write_output(locked, files)
    return stats


def _normalize_title(title):
    """A title in `TITLE_NORMALIZATION` (None and other non-strings, "no usable title", stay as they are)."""
    return unicodedata.normalize(TITLE_NORMALIZATION, title) if isinstance(title, str) else title


def _dense_ids(
    kept_items: pd.DataFrame, inter: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(items, users, interactions) with dense ids in the natural order of the raw ids; the interactions
    keep their file order and their ``order`` column."""
    item_order = natural_order(kept_items["raw_item_id"])
    item_ids = {raw_id: i for i, raw_id in enumerate(item_order)}
    user_order = natural_order(inter["raw_user_id"])
    user_ids = {raw_id: i for i, raw_id in enumerate(user_order)}
    items_out = kept_items.assign(item_id=kept_items["raw_item_id"].map(item_ids).astype("int64"))
    items_out = items_out.sort_values("item_id").reset_index(drop=True)
    text_cols = [c for c in items_out.columns if c not in ("item_id", "title", "raw_item_id", "drop_reason")]
    items_out = items_out[["item_id", "title", "raw_item_id", *text_cols]]
    users_out = pd.DataFrame(
        {"user_id": np.arange(len(user_order), dtype=np.int64), "raw_user_id": user_order}
    )
    dense = pd.DataFrame(
        {
            "user_id": inter["raw_user_id"].map(user_ids).astype("int64").to_numpy(),
            "item_id": inter["raw_item_id"].map(item_ids).astype("int64").to_numpy(),
            "timestamp": inter["timestamp"].astype("int64").to_numpy(),
            "order": inter["order"].to_numpy(),
        }
    )
    return items_out, users_out, dense


def _samples(dense: pd.DataFrame, cfg: ProtocolConfig, out: Path) -> pd.DataFrame:
    """The protocol's samples (with their ``order`` column); a split left empty stops the run."""
    samples = make_samples(dense, cfg)
    check_samples(samples)
    counts = _split_counts(samples)
    empty = [s for s in SPLITS if counts[s] == 0]
    if empty:
        got = ", ".join(f"{s} {n}" for s, n in counts.items())
        raise DataPrepError(
            f"the {empty[0]} split would be empty ({len(samples)} samples: {got}); use more data or fewer "
            "filters, nothing was written",
            out,
        )
    return samples


def _split_counts(samples: pd.DataFrame) -> dict[str, int]:
    return {s: int((samples["split"] == s).sum()) for s in SPLITS}


def _parquet_files(
    items_out: pd.DataFrame, users_out: pd.DataFrame, dense: pd.DataFrame, samples: pd.DataFrame
) -> dict[str, bytes]:
    """The four parquet files of the contract, as bytes (the file names in their written order)."""
    item_schema = pa.schema(ITEM_BASE + [(c, pa.string()) for c in items_out.columns[len(ITEM_BASE) :]])
    inter_out = dense.sort_values(["user_id", "timestamp", "order"], kind="stable")
    return {
        "items.parquet": parquet_bytes(items_out, item_schema),
        "users.parquet": parquet_bytes(users_out, USERS_SCHEMA),
        "interactions.parquet": parquet_bytes(inter_out[["user_id", "item_id", "timestamp"]], INTER_SCHEMA),
        "samples.parquet": parquet_bytes(samples.drop(columns="order"), SAMPLES_SCHEMA),
    }


def _kept_stats(
    items_out: pd.DataFrame,
    dense: pd.DataFrame,
    users_out: pd.DataFrame,
    samples: pd.DataFrame,
    cfg: ProtocolConfig,
    drops: Drops,
) -> dict:
    """stats.json's counts of what was kept and dropped, the samples per split and their history lengths."""
    hist_len = samples["history"].map(len)
    stats = {
        "filtered": {"users": len(users_out), "items": len(items_out), "interactions": len(dense)},
        "dropped": drops.as_dict(),
        "samples": _split_counts(samples) | {"total": len(samples)},
        "avg_history_length": {s: round(float(hist_len[samples["split"] == s].mean()), 4) for s in SPLITS}
        | {"all": round(float(hist_len.mean()), 4)},
        # Titles shared by several items (ML-100K has a few re-listed movies); kept, but reported,
        # because a title trie cannot tell such items apart.
        "duplicate_title_groups": int(
            items_out.loc[items_out["title"].duplicated(keep=False), "title"].nunique()
        ),
    }
    if cfg.name == "d3":
        stats["d3_boundary_ties"] = boundary_ties(samples)
    return stats


def _dropped_text(dropped: dict) -> str:
    """``Drops.as_dict()`` (stats.json's "dropped") as one line: "reason kind: count, ..." or "nothing"."""
    return ", ".join(f"{k} {k2}: {v:,}" for k in dropped for k2, v in dropped[k].items()) or "nothing"


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
    print(f"dropped: {_dropped_text(stats['dropped'])}")
    print(f"wrote {output}/{{items,users,interactions,samples}}.parquet and stats.json")


def run_main(parse: Callable[[Any], Any], run: Callable[[Any], object], argv=None) -> int:
    """The exit status of a data prep command: ``run(parse(argv))``. The parsing stays argparse's own
    (``--help``, a bad option: its message and exit); the run goes under iamrec's one error policy
    (``iamrec.errors.guarded``): an expected error (every ``DataPrepError``) is one sentence
    ``error: ...`` on stderr and exit status 2."""
    args = parse(argv)
    try:
        guarded(lambda: run(args), program=None)
    except SystemExit as exit_:  # guarded's exit after its sentence
        return exit_.code
    return OK
