"""Your own data: any interaction log with an items file of titles -> the processed contract (see
data_prep/common.py), through the same filters, protocols, counted drops and atomic output as the other
sources.

Usage::

    python -m data_prep.interactions --interactions logs.csv --items items.csv --output data/processed/mydata
    python -m data_prep.interactions --interactions clicks.parquet --items catalog.jsonl \\
        --user-col customer --item-col sku --time-col ts --time-unit ms --title-col name --output ...

Files (the format follows the extension, ``.gz`` allowed for text files, or ``--format`` /
``--items-format``):

- ``csv`` (``.csv``, comma; ``--sep`` for another delimiter), ``tsv`` (``.tsv`` / ``.tab``, tab): a header
  line naming the columns, quoted fields as Python's csv reads them, UTF-8 (a byte-order mark is dropped);
- ``jsonl`` (``.jsonl`` / ``.ndjson`` / ``.json``): one JSON object per line;
- ``parquet`` (``.parquet`` / ``.pq``): positions are rows (1-based) instead of lines;
- ``recbole`` (``.inter`` / ``.item``): RecBole atomic files, tab-separated with a ``name:type`` header
  (``python -m data_prep.recbole`` reads a RecBole dataset folder with RecBole's column names).

Columns (``--user-col`` user_id, ``--item-col`` item_id, ``--time-col`` timestamp, ``--title-col``
title, optional ``--rating-col`` for ``--min-rating``; ``--items-item-col`` when the items file names its
id column differently). Ids of any kind (strings, huge integers, UUIDs) are kept verbatim (stripped of
surrounding blanks) as ``raw_item_id`` in items.parquet and ``raw_user_id`` in users.parquet, so that
recommendations map back; a Parquet / JSON integer id is its decimal text, a fractional number is refused.
Times: numbers in seconds (default) or ``--time-unit ms``, fractions kept, or ISO-8601 strings (a zone
or none: a time without one is UTC, and stats.json's ``times`` says how many) — one kind per column
(``data_prep.parsing.TimeColumn``). Interactions in the same second are ordered by their exact time, then
by file order (the rows reach the protocols in that order).

Checks (one sentence naming the file, the line or row, and the column; exit status 2; nothing written):
a named column that the file lacks (the columns it has are listed), a CSV whose header holds another
delimiter than the declared one, a row with another number of fields than the header, mixed time units or
kinds in one column, a bad number, an item listed twice with different titles, a title column empty in
every row. Counted, not fatal: blank lines, rows whose user or item id is blank / null
(``missing_user_id:<file>`` ...), items without a title (``missing_title``), an item listed twice with the
same title (``duplicate_item_record:<file>``), and interactions whose item the items file does not list
(``not_in_items_file``, with a warning naming the first such line). Items nobody interacted with are
dropped as ``no_interactions_left``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.common import build_dataset, print_summary, run_main
from data_prep.output import locked_output
from data_prep.parsing import NS, DataPrepError, TimeColumn, iter_lines, require_file
from data_prep.protocols import Drops, ProtocolConfig
from data_prep.records import FORMATS, file_format, parse_id, parse_rating, parse_title, records

NOT_IN_ITEMS = "not_in_items_file"


@dataclass
class Columns:
    """The column names in the two files; ``title=None``: "title", or RecBole's "movie_title"."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    title: str | None = None
    rating: str | None = None
    items_item: str | None = None  # the items file's id column (default: ``item``)


def read_items(path: Path, fmt: str, cols: Columns, drops: Drops, sep: str | None = None) -> pd.DataFrame:
    """Raw items (``raw_item_id``, ``title``, ``drop_reason``) in file order; see the module docstring."""
    id_col, title_col = cols.items_item or cols.item, cols.title or "title"
    need = {id_col: "--items-item-col" if cols.items_item else "--item-col", title_col: "--title-col"}
    seen: dict[str, tuple[str | None, int]] = {}
    first_line, n_rows = None, 0
    for n, r in records(path, fmt, need, drops, sep):
        first_line = first_line or n
        n_rows += 1
        title = parse_title(r[title_col], title_col, path, n)
        item = parse_id(r[id_col], id_col, path, n)
        if item is None:
            drops.lines[f"missing_item_id:{path.name}"] += 1
            continue
        if item in seen:
            before, at = seen[item]
            if before != title:
                raise DataPrepError(
                    f"column {title_col!r}: item id {item!r} is listed twice with different titles "
                    f"({before!r} on {'row' if fmt == 'parquet' else 'line'} {at}, {title!r} here)",
                    path,
                    n,
                )
            drops.lines[f"duplicate_item_record:{path.name}"] += 1
            continue
        seen[item] = (title, n)
    if not seen:
        raise DataPrepError(
            "no usable items: every item id is blank or null" if n_rows else "no items in the file",
            path,
            first_line,
        )
    if all(t is None for t, _ in seen.values()):
        raise DataPrepError(
            f"column {title_col!r} is empty in every row ({n_rows} rows): the items need titles; name the "
            "title column with --title-col",
            path,
            first_line,
        )
    titles = [t for t, _ in seen.values()]
    return pd.DataFrame(
        {
            "raw_item_id": list(seen),
            "title": titles,
            "drop_reason": ["missing_title" if t is None else None for t in titles],
        }
    )


def read_interactions(
    path: Path, fmt: str, cols: Columns, unit: str, drops: Drops, sep: str | None = None
) -> tuple[pd.DataFrame, list[int], TimeColumn]:
    """Raw interactions (``raw_user_id``, ``raw_item_id``, ``timestamp_ns``[, ``rating``]) in file order,
    their lines, and the time column's reader (its stats)."""
    need = {cols.user: "--user-col", cols.item: "--item-col", cols.time: "--time-col"}
    if cols.rating:
        need[cols.rating] = "--rating-col"
    times = TimeColumn(cols.time, path, unit, "row" if fmt == "parquet" else "line")
    users, items, ns, ratings, lines, first_bad, n_rows = [], [], [], [], [], None, 0
    for n, r in records(path, fmt, need, drops, sep):
        n_rows += 1
        t = times(r[cols.time], n)
        rating = parse_rating(r[cols.rating], cols.rating, path, n) if cols.rating else None
        user, item = parse_id(r[cols.user], cols.user, path, n), parse_id(r[cols.item], cols.item, path, n)
        if user is None or item is None:
            drops.lines[f"missing_{'user' if user is None else 'item'}_id:{path.name}"] += 1
            first_bad = first_bad or n
            continue
        users.append(user)
        items.append(item)
        ns.append(t)
        ratings.append(rating)
        lines.append(n)
    if not users:
        if first_bad:
            raise DataPrepError(
                "no usable interactions: every user or item id is blank or null", path, first_bad
            )
        raise DataPrepError("no interactions in the file", path)
    df = pd.DataFrame(
        {"raw_user_id": users, "raw_item_id": items, "timestamp_ns": np.array(ns, dtype=np.int64)}
    )
    if cols.rating:
        df["rating"] = np.array(ratings, dtype=np.float64)
    return df, lines, times


def add_unlisted_items(
    items: pd.DataFrame,
    inter: pd.DataFrame,
    lines: list[int],
    inter_path: Path,
    items_path: Path,
    reason: str,
) -> pd.DataFrame:
    """Items that interactions name but the items file does not list, as items dropped for ``reason`` (their
    interactions are dropped and counted with them); a warning names the first such line."""
    unknown = ~inter["raw_item_id"].isin(set(items["raw_item_id"]))
    if not unknown.any():
        return items
    i = int(unknown.to_numpy().argmax())
    missing = pd.unique(inter.loc[unknown, "raw_item_id"])
    print(
        f"warning: {int(unknown.sum()):,} interactions name {len(missing):,} item ids that {items_path.name} "
        f"does not list (first: {inter_path}:{lines[i]}, item {inter['raw_item_id'].iloc[i]!r}); they are "
        f"dropped and counted as {reason}",
        file=sys.stderr,
    )
    extra = pd.DataFrame({"raw_item_id": missing, "title": None, "drop_reason": reason})
    return pd.concat([items, extra.astype(items.dtypes.to_dict())], ignore_index=True)


def in_time_order(inter: pd.DataFrame) -> pd.DataFrame:
    """Rows in (exact time, file order) order with ``timestamp`` in whole seconds (the contract's): what
    the protocols then call file order breaks ties within a second by the exact time first."""
    inter = inter.sort_values("timestamp_ns", kind="stable").reset_index(drop=True)
    inter["timestamp"] = inter.pop("timestamp_ns") // NS
    return inter


def title_column(path: Path, fmt: str, title: str | None) -> str:
    """``title`` if given; else "title", or for RecBole files the first of title / movie_title there."""
    if title is not None or fmt != "recbole":
        return title or "title"
    header = next(iter_lines(path), (1, ""))[1]
    names = [f.partition(":")[0] for f in header.split("\t")]
    return next((c for c in ("title", "movie_title") if c in names), "title")


def prepare(
    interactions: str | Path,
    items: str | Path,
    output: str | Path,
    cfg: ProtocolConfig | None = None,
    cols: Columns | None = None,
    time_unit: str = "s",
    fmt: str | None = None,
    items_fmt: str | None = None,
    sep: str | None = None,
    name: str | None = None,
) -> dict:
    """Parse an interactions file and an items file and write the processed dataset; returns stats.json.

    The output's lock is held from the start, so a second run into the same folder stops at once.
    """
    cfg, drops, cols = cfg or ProtocolConfig(), Drops(), cols or Columns()
    ipath, mpath = Path(interactions), Path(items)
    if time_unit not in ("s", "ms"):
        raise DataPrepError(f"--time-unit must be s or ms, got {time_unit!r}")
    with locked_output(output) as out:
        require_file(ipath, "interactions file")
        require_file(mpath, "items file")
        ifmt, mfmt = file_format(ipath, fmt), file_format(mpath, items_fmt or fmt)
        cols = Columns(**{**cols.__dict__, "title": title_column(mpath, mfmt, cols.title)})
        item_df = read_items(mpath, mfmt, cols, drops, sep)
        inter, lines, times = read_interactions(ipath, ifmt, cols, time_unit, drops, sep)
        item_df = add_unlisted_items(item_df, inter, lines, ipath, mpath, NOT_IN_ITEMS)
        columns = {k: v for k, v in cols.__dict__.items() if v is not None}
        return build_dataset(
            items=item_df,
            interactions=in_time_order(inter),
            cfg=cfg,
            output=out,
            input_files=[ipath, mpath],
            source={"dataset": name or ipath.name.split(".")[0], "format": ifmt, "items_format": mfmt},
            drops=drops,
            extra_stats={"columns": columns, "times": times.stats()},
            encodings={p.name: "utf-8" for p, f in ((ipath, ifmt), (mpath, mfmt)) if f != "parquet"},
        )


def add_protocol_args(p: argparse.ArgumentParser, k_core: int = 0) -> None:
    """The protocol options every source shares (see ``data_prep.protocols``)."""
    p.add_argument("--protocol", default="d3", choices=["d3", "loo"], help="split protocol (default d3)")
    p.add_argument(
        "--max-history", type=int, default=None, help="history items per sample (default: d3 10, loo 50)"
    )
    p.add_argument("--k-core", type=int, default=k_core, help=f"iterative k-core (default {k_core}: off)")
    p.add_argument(
        "--min-rating", type=float, default=None, help="keep ratings >= this (needs a rating column)"
    )
    p.add_argument("--start", default=None, help="keep interactions at or after this UTC date (YYYY-MM-DD)")
    p.add_argument("--end", default=None, help="keep interactions before this UTC date (YYYY-MM-DD)")
    p.add_argument(
        "--seed", type=int, default=0, help="recorded in stats.json; the protocols use no randomness"
    )


def protocol_config(a: argparse.Namespace) -> ProtocolConfig:
    return ProtocolConfig(
        name=a.protocol,
        max_history=a.max_history,
        min_rating=a.min_rating,
        k_core=a.k_core,
        start=a.start,
        end=a.end,
        seed=a.seed,
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.interactions",
        description="Your own interaction log + items file with titles (CSV, TSV, JSON Lines, Parquet or "
        "RecBole atomic files) -> items/users/interactions/samples parquet + stats.json (the processed "
        "contract of data_prep/common.py).",
    )
    p.add_argument(
        "--interactions", required=True, type=Path, help="the interactions file (user, item, time)"
    )
    p.add_argument("--items", required=True, type=Path, help="the items file (item id, title)")
    p.add_argument("--output", required=True, type=Path, help="output directory, e.g. data/processed/mydata")
    p.add_argument(
        "--format", default=None, choices=FORMATS, help="format of both files (default: extension)"
    )
    p.add_argument("--items-format", default=None, choices=FORMATS, help="format of the items file")
    p.add_argument(
        "--sep",
        default=None,
        type=_delimiter,
        help="delimiter of CSV / TSV files, one character (default: , for csv, tab for tsv)",
    )
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--title-col", default=None, help="default: title (RecBole .item: title or movie_title)")
    p.add_argument("--rating-col", default=None, help="a rating column, for --min-rating")
    p.add_argument("--items-item-col", default=None, help="the items file's id column (default: --item-col)")
    p.add_argument("--time-unit", default="s", choices=["s", "ms"], help="unit of numeric times (default s)")
    p.add_argument("--name", default=None, help="dataset name in stats.json (default: the file's name)")
    add_protocol_args(p)
    return p.parse_args(argv)


def _delimiter(value: str) -> str:
    """--sep: one character (``\\t`` written out is a tab)."""
    value = "\t" if value == "\\t" else value
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"a delimiter is one character, got {value!r}")
    return value


def _run(a: argparse.Namespace) -> None:
    cols = Columns(a.user_col, a.item_col, a.time_col, a.title_col, a.rating_col, a.items_item_col)
    stats = prepare(
        a.interactions,
        a.items,
        a.output,
        protocol_config(a),
        cols,
        a.time_unit,
        a.format,
        a.items_format,
        a.sep,
        a.name,
    )
    print_summary(stats, a.output)


def main(argv=None) -> int:
    return run_main(parse_args, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
