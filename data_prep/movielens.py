"""MovieLens-100K / 1M -> the processed contract (see data_prep/common.py).

Usage::

    python -m data_prep.movielens --input .assets/raw/ml-100k --output data/processed/ml100k
    python -m data_prep.movielens --input ml-1m --output data/processed/ml1m --protocol loo

Input formats (auto-detected from the file names in ``--input``, or forced with ``--format``):

- ``grouplens-100k``: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``) and ``u.item``
  (24 ``|``-separated latin-1 fields: id, title, release date, video date, URL, 19 genre flags).
- ``grouplens-1m``: ``ratings.dat`` (``user::item::rating::timestamp``) and ``movies.dat``
  (``item::title::genre|genre``), latin-1.
- ``recbole``: RecBole atomic files ``<name>.inter`` (tab-separated, header
  ``user_id:token item_id:token rating:float timestamp:float``) and ``<name>.item`` (header
  ``item_id:token movie_title:token_seq release_year:token class:token_seq``), UTF-8.

Titles keep their year, as in the GroupLens files ("Toy Story (1995)"): RecBole's ``movie_title`` has
the year cut off into ``release_year``, so "Title (year)" is rebuilt when release_year is four digits
and the title does not already end in "(yyyy)" (RecBole item 1412 keeps "(1995)" in its title and has
release_year "V"). A title "unknown" (RecBole: "unkonwn", ML-100K item 267) is no usable title: that item
and its interactions are dropped and counted as ``missing_title``.

Encodings (``--encoding``, default ``auto``): a file that is valid UTF-8 is read as UTF-8 (a leading
byte-order mark is dropped), any other as latin-1 — right for the real GroupLens files (latin-1) and
RecBole's (UTF-8), and a UTF-8 ``u.item`` no longer turns into mangled titles. The encoding used is
recorded per input file in stats.json. ``--encoding latin-1`` (or any other) forces one for both files.

Every rating is an interaction unless ``--min-rating`` is given. Values are parsed strictly (see
``data_prep.parsing``): ratings and timestamps are exact integers ("881250949" or RecBole's
"881250949.0"), a timestamp must lie between 1970 and 2100 in seconds; a line whose user or item id is
blank or a null marker is dropped and counted (``missing_user_id:<file>`` / ``missing_item_id:<file>``).
An item id in the ratings that the item file does not list, a malformed line or value, a missing field or
an empty file stops the run with one message naming the file and line; nothing is written. When the input is recognised as ML-100K / ML-1M (by file names), the raw counts
are compared with the published ones (ML-100K: 100,000 ratings, 943 users, 1,682 items); a mismatch is a
warning, or an error with ``--strict-counts``. Ties, protocols and determinism: see ``data_prep.protocols``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Literal

import pandas as pd

from data_prep.common import build_dataset, print_summary, run_main
from data_prep.output import locked_output
from data_prep.parsing import (
    DataPrepError,
    atomic_rows,
    check_encoding,
    check_time,
    detect_encoding,
    iter_lines,
    parse_int,
    require_file,
    text_id,
)
from data_prep.protocols import Drops, ProtocolConfig

Format = Literal["auto", "grouplens-100k", "grouplens-1m", "recbole"]
# Published sizes: (ratings, users, items in the item file).
KNOWN_COUNTS = {"ml-100k": (100_000, 943, 1_682), "ml-1m": (1_000_209, 6_040, 3_883)}
GENRES_100K = (  # the order of u.genre and of the 19 flags in u.item
    *("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama"),
    *(
        "Fantasy",
        "Film-Noir",
        "Horror",
        "Musical",
        "Mystery",
        "Romance",
        "Sci-Fi",
        "Thriller",
        "War",
        "Western",
    ),
)
MISSING_TITLES = {"", "unknown", "unkonwn"}  # "unkonwn" is RecBole's spelling for ML-100K item 267
YEAR_AT_END = re.compile(r"\(\d{4}\)$")


def detect_format(input_dir: Path) -> Format:
    if not input_dir.is_dir():
        raise DataPrepError("input directory not found", input_dir)
    if (input_dir / "u.data").exists():
        return "grouplens-100k"
    if (input_dir / "ratings.dat").exists():
        return "grouplens-1m"
    if list(input_dir.glob("*.inter")):
        return "recbole"
    raise DataPrepError(
        "no MovieLens files found: expected u.data + u.item (ML-100K), ratings.dat + movies.dat (ML-1M) "
        "or RecBole <name>.inter + <name>.item",
        input_dir,
    )


def _time(value: str, path: Path, line: int) -> int:
    return check_time(parse_int(value, "timestamp", path, line), "timestamp", path, line)


def _ids(
    fields: list[str], path: Path, line: int, drops: Drops, first_bad: list[int]
) -> tuple[str, str] | None:
    """(user id, item id) of a rating line, or None (counted) when one of them is blank / null."""
    user, item = text_id(fields[0]), text_id(fields[1])
    if user is not None and item is not None:
        return user, item
    drops.lines[f"missing_{'user' if user is None else 'item'}_id:{path.name}"] += 1
    first_bad.append(line)
    return None


def _clean(title: str) -> str | None:
    t = " ".join(title.split())
    return None if t.lower() in MISSING_TITLES else t


def _items_frame(
    rows: list[tuple], lines: list[int], path: Path, extra: list[str], first_bad: list[int]
) -> pd.DataFrame:
    if not rows:
        if first_bad:
            raise DataPrepError("no usable items: every item id is blank or null", path, first_bad[0])
        raise DataPrepError("no items in the file", path)
    df = pd.DataFrame(rows, columns=["raw_item_id", "title", *extra])
    dup = df["raw_item_id"].duplicated().to_numpy()
    if dup.any():
        i = int(dup.argmax())
        raise DataPrepError(f"item id {df['raw_item_id'].iloc[i]!r} is listed twice", path, lines[i])
    df["drop_reason"] = df["title"].isna().map({True: "missing_title", False: None})
    return df


def _ratings_frame(
    rows: list[tuple], lines: list[int], path: Path, items: pd.DataFrame, first_bad: list[int]
) -> pd.DataFrame:
    if not rows:
        if first_bad:
            raise DataPrepError(
                "no usable ratings: every user or item id is blank or null", path, first_bad[0]
            )
        raise DataPrepError("no ratings in the file", path)
    df = pd.DataFrame(rows, columns=["raw_user_id", "raw_item_id", "rating", "timestamp"])
    unknown = ~df["raw_item_id"].isin(set(items["raw_item_id"]))
    if unknown.any():
        i = int(unknown.to_numpy().argmax())
        raise DataPrepError(
            f"item id {df['raw_item_id'].iloc[i]!r} is not in the item file ({unknown.sum()} such rows)",
            path,
            lines[i],
        )
    df["timestamp"] = df["timestamp"].astype("int64")
    return df


def _split_lines(path: Path, sep: str, n_fields: int, names: str, encoding: str, drops: Drops):
    """Yield (line number, fields) with exactly n_fields fields; blank lines are counted, not parsed."""
    for i, line in iter_lines(path, encoding):
        if not line.strip():
            drops.lines[f"blank:{path.name}"] += 1
            continue
        fields = line.split(sep)
        if len(fields) != n_fields:
            raise DataPrepError(
                f"expected {n_fields} {sep!r}-separated fields ({names}), got {len(fields)}: {line[:80]!r}",
                path,
                i,
            )
        yield i, fields


def _item_id(value: str, path: Path, line: int, drops: Drops, first_bad: list[int]) -> str | None:
    item = text_id(value)
    if item is None:
        drops.lines[f"missing_item_id:{path.name}"] += 1
        first_bad.append(line)
    return item


def read_grouplens(input_dir: Path, one_m: bool, drops: Drops, encoding: str = "auto"):
    ratings_name, items_name = ("ratings.dat", "movies.dat") if one_m else ("u.data", "u.item")
    rpath = require_file(input_dir / ratings_name, "ratings file")
    ipath = require_file(input_dir / items_name, "item file")
    enc = {p.name: detect_encoding(p, encoding, "latin-1") for p in (rpath, ipath)}
    items, item_lines, bad_items = [], [], []
    if one_m:
        for i, f in _split_lines(ipath, "::", 3, "item::title::genres", enc[ipath.name], drops):
            if (item := _item_id(f[0], ipath, i, drops, bad_items)) is not None:
                items.append((item, _clean(f[1]), f[2].strip()))
                item_lines.append(i)
    else:
        for i, f in _split_lines(
            ipath, "|", 24, "id|title|date|video date|URL|19 genre flags", enc[ipath.name], drops
        ):
            if any(x not in ("0", "1") for x in f[5:]):
                raise DataPrepError("genre flags (fields 6-24) must be 0 or 1", ipath, i)
            genres = "|".join(g for g, x in zip(GENRES_100K, f[5:]) if x == "1")
            if (item := _item_id(f[0], ipath, i, drops, bad_items)) is not None:
                items.append((item, _clean(f[1]), genres))
                item_lines.append(i)
    items_df = _items_frame(items, item_lines, ipath, ["genres"], bad_items)
    sep, rows, lines, bad = ("::" if one_m else "\t"), [], [], []
    for i, f in _split_lines(rpath, sep, 4, "user item rating timestamp", enc[rpath.name], drops):
        rating, t = parse_int(f[2], "rating", rpath, i), _time(f[3], rpath, i)
        if (ids := _ids(f, rpath, i, drops, bad)) is not None:
            rows.append((*ids, rating, t))
            lines.append(i)
    return items_df, _ratings_frame(rows, lines, rpath, items_df, bad), [rpath, ipath], enc


def read_recbole(input_dir: Path, drops: Drops, encoding: str = "auto"):
    inters = sorted(input_dir.glob("*.inter"))
    if len(inters) != 1:
        raise DataPrepError(f"expected one RecBole .inter file, found {len(inters)}", input_dir)
    rpath = require_file(inters[0], "RecBole .inter file")
    ipath = require_file(rpath.with_suffix(".item"), "RecBole .item file")
    enc = {p.name: detect_encoding(p, encoding, "latin-1") for p in (rpath, ipath)}
    items, item_lines, added_year, bad_items = [], [], 0, []
    first_row = next(atomic_rows(ipath, ("item_id",), Drops(), enc[ipath.name]), None)  # header check first
    if first_row is not None and not {"movie_title", "title"} & set(first_row[1]):
        raise DataPrepError("the RecBole .item header has no movie_title column", ipath, 1)
    for i, r in atomic_rows(ipath, ("item_id",), drops, enc[ipath.name]):
        title = _clean(r.get("movie_title", r.get("title", "")))
        year = r.get("release_year", "").strip()
        if title is not None and re.fullmatch(r"\d{4}", year) and not YEAR_AT_END.search(title):
            title, added_year = f"{title} ({year})", added_year + 1
        if (item := _item_id(r["item_id"], ipath, i, drops, bad_items)) is not None:
            items.append((item, title, "|".join(r.get("class", r.get("genre", "")).split())))
            item_lines.append(i)
    items_df = _items_frame(items, item_lines, ipath, ["genres"], bad_items)
    rows, lines, bad = [], [], []
    for i, r in atomic_rows(rpath, ("user_id", "item_id", "timestamp"), drops, enc[rpath.name]):
        rating = parse_int(r["rating"], "rating", rpath, i) if "rating" in r else 0
        t = _time(r["timestamp"], rpath, i)
        if (ids := _ids([r["user_id"], r["item_id"]], rpath, i, drops, bad)) is not None:
            rows.append((*ids, rating, t))
            lines.append(i)
    ratings = _ratings_frame(rows, lines, rpath, items_df, bad)
    return items_df, ratings, [rpath, ipath, added_year], enc


def check_known_counts(name: str, raw: dict, strict: bool) -> dict | None:
    if name not in KNOWN_COUNTS:
        return None
    want = dict(zip(("interactions", "users", "items"), KNOWN_COUNTS[name]))
    got = {k: raw[k] for k in want}
    ok = got == want
    if not ok:
        msg = f"{name}: expected the published counts {want}, got {got}; this is not the full {name}"
        if strict:
            raise DataPrepError(msg)
        print(f"warning: {msg}", file=sys.stderr)
    return {"dataset": name, "expected": want, "matches": ok}


def prepare(
    input_dir: str | Path,
    output: str | Path,
    fmt: Format = "auto",
    cfg: ProtocolConfig | None = None,
    strict_counts: bool = False,
    encoding: str = "auto",
) -> dict:
    """Parse one MovieLens directory and write the processed dataset; returns stats.json's content.

    The output's lock is held from the start, so a second run into the same folder stops at once.
    """
    input_dir, cfg, drops = Path(input_dir), cfg or ProtocolConfig(), Drops()
    if encoding != "auto":
        check_encoding(encoding)
    if fmt not in ("auto", "recbole", "grouplens-100k", "grouplens-1m"):
        raise DataPrepError(f"--format must be auto, grouplens-100k, grouplens-1m or recbole, got {fmt!r}")
    with locked_output(output) as out:
        fmt = detect_format(input_dir) if fmt == "auto" else fmt
        extra = {}
        if fmt == "recbole":
            items, ratings, (rpath, ipath, added), enc = read_recbole(input_dir, drops, encoding)
            files, name = [rpath, ipath], rpath.stem
            extra["titles_with_year_rebuilt"] = added
        else:
            one_m = fmt == "grouplens-1m"
            items, ratings, files, enc = read_grouplens(input_dir, one_m, drops, encoding)
            name = "ml-1m" if one_m else "ml-100k"
        raw = {"interactions": len(ratings), "users": ratings["raw_user_id"].nunique(), "items": len(items)}
        known = check_known_counts(name, raw, strict_counts)
        if known:
            extra["known_counts"] = known
        return build_dataset(
            items=items,
            interactions=ratings,
            cfg=cfg,
            output=out,
            input_files=files,
            source={"dataset": name, "format": fmt},
            drops=drops,
            extra_stats=extra,
            encodings=enc,
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.movielens",
        description="MovieLens-100K/1M (GroupLens or RecBole atomic files) -> items/interactions/samples "
        "parquet + stats.json (the processed contract of data_prep/common.py).",
    )
    p.add_argument("--input", required=True, type=Path, help="directory with the raw files")
    p.add_argument("--output", required=True, type=Path, help="output directory, e.g. data/processed/ml100k")
    p.add_argument("--format", default="auto", choices=["auto", "grouplens-100k", "grouplens-1m", "recbole"])
    p.add_argument(
        "--encoding",
        default="auto",
        help="text encoding of both files (default auto: UTF-8 when the file is valid UTF-8, else latin-1)",
    )
    p.add_argument("--protocol", default="d3", choices=["d3", "loo"], help="split protocol (default d3)")
    p.add_argument(
        "--max-history", type=int, default=None, help="history items per sample (default: d3 10, loo 50)"
    )
    p.add_argument(
        "--min-rating", type=float, default=None, help="keep ratings >= this (default: every rating counts)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="recorded in stats.json; the protocols use no randomness"
    )
    p.add_argument(
        "--strict-counts", action="store_true", help="error (not warn) when ML-100K/1M counts differ"
    )
    return p.parse_args(argv)


def _run(a: argparse.Namespace) -> None:
    cfg = ProtocolConfig(name=a.protocol, max_history=a.max_history, min_rating=a.min_rating, seed=a.seed)
    stats = prepare(a.input, a.output, a.format, cfg, a.strict_counts, a.encoding)
    print_summary(stats, a.output)


def main(argv=None) -> int:
    return run_main(parse_args, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
