"""Amazon reviews 2014 / 2018 / 2023 (one category) -> the processed contract (see data_prep/common.py).

Usage::

    python -m data_prep.amazon --input raw/amazon2018-toys --output data/processed/toys \\
        --start 2016-10-01 --end 2018-11-01

Input files in ``--input`` (``.json`` / ``.jsonl``, or gzipped; or name them with ``--reviews`` / ``--meta``):

- 2014 (McAuley et al.): ``reviews_<Category>_5.json`` — JSON lines with ``reviewerID``, ``asin``,
  ``unixReviewTime``; ``meta_<Category>.json`` — one **Python dict literal** per line (single quotes),
  parsed with ``ast.literal_eval`` (never ``eval``); ``title`` may be missing, ``categories`` is a list of
  lists.
- 2018 (Ni et al.): ``<Category>_5.json`` (or ``<Category>.json``) — JSON lines with the same three
  fields; ``meta_<Category>.json`` — JSON lines whose ``title`` may hold HTML entities or markup.
- 2023 (Hou et al., Amazon Reviews 2023): ``<Category>.jsonl`` — JSON lines with ``user_id``,
  ``parent_asin`` (the item: reviews of an item's variants share it) and ``timestamp`` in
  **milliseconds**; ``meta_<Category>.jsonl`` — JSON lines keyed by ``parent_asin`` with ``title`` and
  ``categories`` (a list of strings). Times are read exactly (``data_prep.parsing.TimeColumn``: a value in
  seconds among milliseconds stops the run); reviews in the same second are ordered by their exact time,
  then by file order.

The format follows the review file name (``*.jsonl`` = 2023, ``reviews_*`` = 2014, else 2018) unless
``--format`` says otherwise.

D3 filters, in this order, every dropped row counted by reason in stats.json:
time window (``--start`` inclusive, ``--end`` exclusive, UTC dates; ``out_of_window``) -> items without
a usable title (``no_metadata``: asin not in the metadata, which real dumps have; ``missing_title``: no or
empty title) -> HTML entities are unescaped (repeatedly, for double-escaped text) and titles that still
contain markup are dropped (``html_title``) -> titles over 20 words (``long_title``) -> repeated
(user, item) reviews, earliest kept (``duplicate``) -> iterative ``--k-core`` (default 5) on users and
items. A line that is not valid JSON / a dict literal, misses reviewerID / asin / unixReviewTime, or holds a
value of the wrong type stops the run with one message naming the file, line and field (nothing is written):
``unixReviewTime`` must be an exact integer (JSON floats are parsed as decimals, never through float;
NaN, Infinity, fractions and huge numbers are refused) between 1970 and 2100 in seconds; ids must be
strings (or integers). A review whose reviewerID / asin is null or blank is dropped and counted
(``missing_user_id:<file>`` / ``missing_item_id:<file>``), as is a metadata record with a null or blank
asin (``missing_asin:<file>``); a ``categories`` / ``category`` value that is not a list of strings is
left empty and counted under ``dropped.values`` (``categories_not_a_list:<file>``). Files are UTF-8
(JSON's encoding; a leading byte-order mark is dropped); an undecodable line is named. Metadata records of items nobody reviewed are
not part of the dataset; their number is reported as ``meta_records_not_reviewed``.
Protocols, ties and determinism: see ``data_prep.protocols``.
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import re
import sys
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Literal

import pandas as pd

from data_prep.common import build_dataset, print_summary, run_main
from data_prep.interactions import in_time_order
from data_prep.output import locked_output
from data_prep.parsing import (
    DataPrepError,
    TimeColumn,
    check_time,
    json_id,
    json_int,
    object_lines,
    require_file,
)
from data_prep.protocols import Drops, ProtocolConfig

Format = Literal["auto", "2014", "2018", "2023"]
# (user, item, time) fields of a review, and the metadata's item key, per release.
FIELDS = {
    "2014": ("reviewerID", "asin", "unixReviewTime", "asin"),
    "2018": ("reviewerID", "asin", "unixReviewTime", "asin"),
    "2023": ("user_id", "parent_asin", "timestamp", "parent_asin"),
}
MAX_TITLE_WORDS = 20
HTML_TAG = re.compile(r"<\s*/?\s*[a-zA-Z!][^>]*>")


def find_files(input_dir: Path, reviews: Path | None, meta: Path | None) -> tuple[Path, Path]:
    """The review and metadata files: given explicitly, or the only candidates in input_dir."""

    def one(kind: str, cands: list[Path]) -> Path:
        if len(cands) != 1:
            names = ", ".join(p.name for p in cands) or "none"
            raise DataPrepError(f"expected one {kind} file (found {names}); name it with --{kind}", input_dir)
        return cands[0]

    if reviews is None or meta is None:
        if input_dir is None or not input_dir.is_dir():
            raise DataPrepError("input directory not found (or give --reviews and --meta)", input_dir)
        files = sorted(
            p for p in input_dir.iterdir() if p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))
        )
        meta = meta or one("meta", [p for p in files if p.name.startswith("meta_")])
        reviews = reviews or one("reviews", [p for p in files if not p.name.startswith("meta_")])
    return require_file(reviews, "review file"), require_file(meta, "metadata file")


def clean_title(title) -> tuple[str | None, str | None]:
    """(cleaned title, drop reason or None) following the D3 filters in the module docstring."""
    if not isinstance(title, str) or not title.strip():
        return None, "missing_title"
    for _ in range(3):  # "&amp;quot;" is double-escaped in some dumps
        unescaped = html.unescape(title)
        if unescaped == title:
            break
        title = unescaped
    title = " ".join(title.split())
    if HTML_TAG.search(title):
        return title, "html_title"
    if len(title.split()) > MAX_TITLE_WORDS:
        return title, "long_title"
    return title, None


def read_reviews(path: Path, drops: Drops, fmt: str = "2018") -> tuple[pd.DataFrame, list[int]]:
    user_key, item_key, time_key, _ = FIELDS[fmt]
    times = TimeColumn(time_key, path, "ms") if fmt == "2023" else None
    rows, lines, first_bad = [], [], None
    for i, r in object_lines(path, partial(json.loads, parse_float=Decimal), "JSON", drops.lines):
        missing = [k for k in (user_key, item_key, time_key) if k not in r]
        if missing:
            raise DataPrepError(
                f"column {missing[0]!r}: the review has no {', '.join(missing)} (its fields: {', '.join(r)})",
                path,
                i,
            )
        if times is not None:
            t = times(r[time_key], i)
        else:
            t = check_time(json_int(r[time_key], time_key, path, i), time_key, path, i)
        user = json_id(r[user_key], user_key, path, i)
        item = json_id(r[item_key], item_key, path, i)
        if user is None or item is None:
            drops.lines[f"missing_{'user' if user is None else 'item'}_id:{path.name}"] += 1
            first_bad = first_bad or i
            continue
        rows.append((user, item, t))
        lines.append(i)
    if not rows:
        if first_bad:
            raise DataPrepError(
                "no usable reviews: every reviewerID or asin is null or blank", path, first_bad
            )
        raise DataPrepError("no reviews in the file", path)
    if times is not None:  # exact milliseconds: ties within a second go by the exact time
        df = pd.DataFrame(rows, columns=["raw_user_id", "raw_item_id", "timestamp_ns"])
        df["timestamp_ns"] = df["timestamp_ns"].astype("int64")
        return df, lines
    df = pd.DataFrame(rows, columns=["raw_user_id", "raw_item_id", "timestamp"])
    df["timestamp"] = df["timestamp"].astype("int64")
    return df, lines


def categories_text(cats) -> str | None:
    """ " > "-joined category path; 2014's list of paths -> the first path; None when not a list of strings."""
    if cats is None:
        return ""
    if isinstance(cats, list) and cats and isinstance(cats[0], list):  # 2014: list of category paths
        cats = cats[0]
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        return None
    return " > ".join(cats)


def read_meta(path: Path, fmt: str, reviewed: set[str], drops: Drops) -> tuple[pd.DataFrame, int]:
    """One row per reviewed asin (with its drop reason, if any); also the count of unreviewed records."""
    parse = ast.literal_eval if fmt == "2014" else json.loads
    key = FIELDS[fmt][3]
    meta: dict[str, dict] = {}
    n_lines = 0
    for i, r in object_lines(path, parse, "Python dict" if fmt == "2014" else "JSON", drops.lines):
        n_lines += 1
        if key not in r:
            raise DataPrepError(f"column {key!r}: the metadata record has no {key}", path, i)
        asin = json_id(r[key], key, path, i)
        if asin is None:
            drops.lines[f"missing_{key}:{path.name}"] += 1
            continue
        if asin in meta:
            drops.lines["duplicate_meta_record"] += 1
            continue
        meta[asin] = r
    if n_lines == 0:
        raise DataPrepError("no metadata records in the file", path)
    rows = []
    for asin in sorted(reviewed):
        if asin not in meta:
            rows.append((asin, None, "", "no_metadata"))
            continue
        r = meta[asin]
        title, reason = clean_title(r.get("title"))
        cats = categories_text(r.get("category") if fmt == "2018" else r.get("categories"))
        if cats is None:
            drops.values[f"categories_not_a_list:{path.name}"] += 1
            cats = ""
        rows.append((asin, title, cats, reason))
    items = pd.DataFrame(rows, columns=["raw_item_id", "title", "categories", "drop_reason"])
    return items, sum(1 for a in meta if a not in reviewed)


def prepare(
    input_dir: str | Path | None,
    output: str | Path,
    fmt: Format = "auto",
    cfg: ProtocolConfig | None = None,
    reviews: str | Path | None = None,
    meta: str | Path | None = None,
) -> dict:
    """Parse one Amazon category and write the processed dataset; returns stats.json's content.

    The output's lock is held from the start, so a second run into the same folder stops at once.
    """
    cfg, drops = cfg or ProtocolConfig(k_core=5), Drops()
    if fmt not in ("auto", "2014", "2018", "2023"):
        raise DataPrepError(f"--format must be auto, 2014, 2018 or 2023, got {fmt!r}")
    with locked_output(output) as out:
        rpath, mpath = find_files(
            Path(input_dir) if input_dir else None,
            Path(reviews) if reviews else None,
            Path(meta) if meta else None,
        )
        if fmt == "auto":
            jsonl = ".jsonl" in rpath.name
            fmt = "2023" if jsonl else "2014" if rpath.name.startswith("reviews_") else "2018"
        inter, _ = read_reviews(rpath, drops, fmt)
        items, not_reviewed = read_meta(mpath, fmt, set(inter["raw_item_id"]), drops)
        return build_dataset(
            items=items,
            interactions=in_time_order(inter) if fmt == "2023" else inter,
            cfg=cfg,
            output=out,
            input_files=[rpath, mpath],
            source={"dataset": rpath.name.split(".json")[0], "format": f"amazon-{fmt}"},
            drops=drops,
            extra_stats={"meta_records_not_reviewed": not_reviewed, "max_title_words": MAX_TITLE_WORDS},
            encodings={rpath.name: "utf-8", mpath.name: "utf-8"},
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.amazon",
        description="Amazon reviews 2014/2018/2023 (one category) -> items/interactions/samples parquet + "
        "stats.json (the processed contract of data_prep/common.py), with the D3 title filters and k-core.",
    )
    p.add_argument(
        "--input", type=Path, default=None, help="directory with one review file and one meta_ file"
    )
    p.add_argument("--reviews", type=Path, default=None, help="review file (overrides the search in --input)")
    p.add_argument("--meta", type=Path, default=None, help="metadata file (overrides the search in --input)")
    p.add_argument("--output", required=True, type=Path, help="output directory, e.g. data/processed/toys")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "2014", "2018", "2023"],
        help="release (default: file name)",
    )
    p.add_argument("--protocol", default="d3", choices=["d3", "loo"], help="split protocol (default d3)")
    p.add_argument(
        "--max-history", type=int, default=None, help="history items per sample (default: d3 10, loo 50)"
    )
    p.add_argument("--k-core", type=int, default=5, help="iterative k-core on users and items (0 = off)")
    p.add_argument("--start", default=None, help="keep reviews at or after this UTC date (YYYY-MM-DD)")
    p.add_argument("--end", default=None, help="keep reviews before this UTC date (YYYY-MM-DD)")
    p.add_argument(
        "--seed", type=int, default=0, help="recorded in stats.json; the protocols use no randomness"
    )
    a = p.parse_args(argv)
    if a.input is None and (a.reviews is None or a.meta is None):
        p.error("give --input DIR, or both --reviews and --meta")
    return a


def _run(a: argparse.Namespace) -> None:
    cfg = ProtocolConfig(
        name=a.protocol, max_history=a.max_history, k_core=a.k_core, start=a.start, end=a.end, seed=a.seed
    )
    stats = prepare(a.input, a.output, a.format, cfg, a.reviews, a.meta)
    print_summary(stats, a.output)


def main(argv=None) -> int:
    return run_main(parse_args, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
