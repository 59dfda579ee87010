"""Your own data (issue 22): data_prep.interactions (CSV, TSV, JSON Lines, Parquet), data_prep.recbole (any
RecBole atomic dataset) and data_prep.amazon's 2023 release, on small format-exact files written here.

Every route gets the 13 ratings of the MovieLens RecBole fixture (tests/fixtures/raw/ml100k_recbole;
item 6 has no usable title), moved to September 2020 (milliseconds of 1970's first minutes read as
seconds), re-written in its format, and must give the folder the existing route (data_prep.movielens)
makes from them: byte-identical samples, users and interactions parquet files.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from data_prep import amazon, interactions, movielens, recbole
from data_prep.protocols import ProtocolConfig

RAW = Path(__file__).parent / "fixtures" / "raw" / "ml100k_recbole"
SHIFT = 1_600_000_000  # seconds added to the fixture's times (100 .. 360)
SAME = ("samples.parquet", "users.parquet", "interactions.parquet")
OUTPUTS = ("items.parquet", "users.parquet", "interactions.parquet", "samples.parquet", "stats.json")


def _fixture() -> tuple[list[tuple[str, str, str, int]], list[tuple[str, str]]]:
    """(user, item, rating, seconds) ratings and (item, title) items; item 6's title is blank."""
    inter = [line.split("\t") for line in (RAW / "ml-100k.inter").read_text().splitlines()[1:]]
    items = [line.split("\t") for line in (RAW / "ml-100k.item").read_text().splitlines()[1:]]
    return (
        [(u, i, r, int(t) + SHIFT) for u, i, r, t in inter],
        [(i, "" if t == "unkonwn" else t) for i, t, *_ in items],
    )


RATINGS, ITEMS = _fixture()


def write_csv(path: Path, header: list[str], rows, sep: str = ",") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, records) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def write_route(d: Path, route: str) -> list[str]:
    """The fixture in one route's format under d; returns the argv (without --output) of its command."""
    d.mkdir(parents=True, exist_ok=True)
    inter_rows = [(u, i, t) for u, i, _, t in RATINGS]
    if route in ("csv", "tsv", "csv.gz"):
        sep, ext = ("\t", "tsv") if route == "tsv" else (",", route)
        inter = write_csv(d / f"inter.{ext}", ["user_id", "item_id", "timestamp"], inter_rows, sep)
        items = write_csv(d / f"items.{ext}", ["item_id", "title"], ITEMS, sep)
        return ["--interactions", inter, "--items", items]
    if route == "parquet":  # integer ids and times, as a warehouse export would hold them
        frame = pd.DataFrame(inter_rows, columns=["user_id", "item_id", "timestamp"]).astype("int64")
        frame.to_parquet(d / "inter.parquet")
        pd.DataFrame(ITEMS, columns=["item_id", "title"]).astype({"item_id": "int64"}).to_parquet(
            d / "items.parquet"
        )
        return ["--interactions", d / "inter.parquet", "--items", d / "items.parquet"]
    if route == "jsonl":  # other column names, ISO-8601 times with a zone
        recs = [
            {"uid": u, "sku": i, "at": pd.Timestamp(t, unit="s", tz="UTC").isoformat()}
            for u, i, t in inter_rows
        ]
        write_jsonl(d / "inter.jsonl", recs)
        write_jsonl(d / "items.jsonl", [{"sku": i, "name": t or None} for i, t in ITEMS])
        cols = ["--user-col", "uid", "--item-col", "sku", "--time-col", "at", "--title-col", "name"]
        return ["--interactions", d / "inter.jsonl", "--items", d / "items.jsonl", *cols]
    if route == "recbole":
        header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        (d / "shop.inter").write_text(header + "".join(f"{u}\t{i}\t{r}\t{t}.0\n" for u, i, r, t in RATINGS))
        rows = "".join(f"{i}\t{t}\tx y\n" for i, t in ITEMS)
        (d / "shop.item").write_text("item_id:token\ttitle:token_seq\tcategories:token_seq\n" + rows)
        return ["--input", d]
    assert route in ("amazon2023", "amazon2023.gz")
    gz = ".gz" if route.endswith(".gz") else ""
    reviews = [
        {"rating": float(r), "title": "ok", "text": "", "asin": f"A{i}", "parent_asin": i, "user_id": u}
        | {"timestamp": t * 1000, "helpful_vote": 0, "verified_purchase": True}
        for u, i, r, t in RATINGS
    ]
    write_jsonl(d / f"Toys_and_Games.jsonl{gz}", reviews)
    meta = [
        {"main_category": "Toys", "title": t or None, "parent_asin": i, "categories": ["Toys"]}
        for i, t in ITEMS
    ]
    write_jsonl(d / f"meta_Toys_and_Games.jsonl{gz}", meta)
    return ["--input", d]


MAINS = {"recbole": recbole.main, "amazon2023": amazon.main, "amazon2023.gz": amazon.main}


def run(route: str, argv: list, out: Path, *extra: str) -> int:
    main = MAINS.get(route, interactions.main)
    return main([str(a) for a in [*argv, "--output", out, *extra]])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """The existing route's folders (data_prep.movielens on the RecBole fixture), d3 and loo."""
    root = tmp_path_factory.mktemp("ref")
    (root / "raw").mkdir()
    (root / "raw" / "ml-100k.item").write_bytes((RAW / "ml-100k.item").read_bytes())
    lines = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS)
    (root / "raw" / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + lines
    )
    for name in ("d3", "loo"):
        movielens.prepare(root / "raw", root / name, cfg=ProtocolConfig(name=name))
    return {"d3": root / "d3", "loo": root / "loo"}


ROUTES = ["csv", "tsv", "csv.gz", "parquet", "jsonl", "recbole", "amazon2023", "amazon2023.gz"]


@pytest.mark.parametrize("route", ROUTES)
def test_each_route_gives_the_existing_routes_folder(tmp_path, reference, route, capsys):
    argv = write_route(tmp_path / "raw", route)
    protocol = "loo" if route in ("tsv", "amazon2023.gz") else "d3"
    extra = ("--protocol", protocol, *(("--k-core", "0") if route.startswith("amazon") else ()))
    assert run(route, argv, tmp_path / "out", *extra) == 0
    assert "train " in capsys.readouterr().out
    for name in SAME:
        assert (tmp_path / "out" / name).read_bytes() == (reference[protocol] / name).read_bytes(), name
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    want = json.loads((reference[protocol] / "stats.json").read_text())
    for key in ("filtered", "samples", "protocol", "avg_history_length"):
        assert stats[key] == want[key], key
    assert stats["dropped"]["interactions"] == {"missing_title": 1}
    items = pd.read_parquet(tmp_path / "out" / "items.parquet")
    assert items["raw_item_id"].tolist() == ["1", "2", "3", "4", "5"]
    assert items["title"].iloc[2] == "Misérables, Les"  # quoted comma (CSV), UTF-8


def test_generic_formats_write_the_same_items_and_rerun_is_byte_identical(tmp_path):
    folders = []
    for route in ("csv", "parquet", "jsonl", "csv"):
        folders.append(tmp_path / f"out{len(folders)}")
        assert run(route, write_route(tmp_path / route, route), folders[-1]) == 0
    for name in ("items.parquet", *SAME):
        assert len({(f / name).read_bytes() for f in folders}) == 1, name
    a, b = folders[0], folders[3]  # the same files twice: every output byte-identical, stats.json included
    assert [(a / f).read_bytes() for f in OUTPUTS] == [(b / f).read_bytes() for f in OUTPUTS]
    stats = json.loads((folders[2] / "stats.json").read_text())
    assert stats["times"] == {"column": "at", "read_as": "ISO-8601 dates", "naive_dates_read_as_utc": 0}
    assert stats["columns"] == {"user": "uid", "item": "sku", "time": "at", "title": "name"}


def test_ids_of_any_kind_are_kept_verbatim(tmp_path):
    users = ["5f0c6b2e-3c1a-4a8e-9b7d-2f1e0c9a8b7d", "12345678901234567890123456789", "007"]
    items = ["B07XJ8C8F5", "98765432109876543210", "item with spaces", "x/y#1"]
    rows = [
        {"user_id": u, "item_id": i, "timestamp": 1_600_000_000 + 10 * k + j}
        for k, u in enumerate(users)
        for j, i in enumerate(items)
    ]
    rows[4]["user_id"] = int(users[1])  # a JSON integer beyond int64: the same user as the text "1234..."
    write_jsonl(tmp_path / "i.jsonl", rows)
    write_jsonl(tmp_path / "t.jsonl", [{"item_id": i, "title": f"Title {k}"} for k, i in enumerate(items)])
    assert (
        interactions.main(
            [
                "--interactions",
                str(tmp_path / "i.jsonl"),
                "--items",
                str(tmp_path / "t.jsonl"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    got_users = pd.read_parquet(tmp_path / "o" / "users.parquet")["raw_user_id"].tolist()
    assert sorted(got_users) == sorted(users)
    got_items = pd.read_parquet(tmp_path / "o" / "items.parquet")
    assert sorted(got_items["raw_item_id"]) == sorted(items)
    assert got_items.set_index("raw_item_id").loc["98765432109876543210", "title"] == "Title 1"


def test_times_ms_iso_naive_and_ties_within_a_second(tmp_path):
    # User u1 sees B then A in the same second; the milliseconds (not the file order) say A came first.
    lines = [("u1", "B", 1_600_000_000_900), ("u1", "A", 1_600_000_000_100), ("u1", "C", 1_600_000_050_000)]
    lines += [(f"u{k}", "A", 1_600_000_100_000 + k) for k in range(2, 6)] + [
        (f"u{k}", "C", 1_600_000_200_000 + k) for k in range(2, 6)
    ]
    write_csv(tmp_path / "ms.csv", ["user_id", "item_id", "timestamp"], lines)
    write_csv(tmp_path / "items.csv", ["item_id", "title"], [("A", "Alpha"), ("B", "Beta"), ("C", "Gamma")])
    iso = [(u, i, pd.Timestamp(t, unit="ms").strftime("%Y-%m-%dT%H:%M:%S.%f")) for u, i, t in lines]
    write_csv(tmp_path / "iso.csv", ["user_id", "item_id", "timestamp"], iso)  # naive: read as UTC
    s1 = interactions.prepare(tmp_path / "ms.csv", tmp_path / "items.csv", tmp_path / "a", time_unit="ms")
    s2 = interactions.prepare(tmp_path / "iso.csv", tmp_path / "items.csv", tmp_path / "b")
    assert (tmp_path / "a" / "samples.parquet").read_bytes() == (
        tmp_path / "b" / "samples.parquet"
    ).read_bytes()
    assert s1["times"] == {"column": "timestamp", "read_as": "milliseconds"}
    assert s2["times"]["naive_dates_read_as_utc"] == 11 and "read as UTC" in s2["times"]["note"]
    inter = pd.read_parquet(tmp_path / "a" / "interactions.parquet")
    assert inter.loc[inter["user_id"] == 0, "item_id"].tolist() == [0, 1, 2]  # A (ms 100), B (ms 900), C
    assert inter["timestamp"].iloc[0] == 1_600_000_000  # the contract's whole seconds


def test_items_absent_from_the_items_file_are_counted_dropped_and_printed(tmp_path, capsys):
    argv = write_route(tmp_path / "raw", "csv")
    with open(argv[1], "a") as f:
        f.write("3,77,400\n1,77,410\n")
    assert run("csv", argv, tmp_path / "o") == 0
    cap = capsys.readouterr()
    assert (
        f"2 interactions name 1 item ids that items.csv does not list (first: {argv[1]}:15, item '77')"
        in cap.err
    )
    assert "not_in_items_file: 2" in cap.out
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["dropped"]["interactions"] == {"missing_title": 1, "not_in_items_file": 2}
    assert stats["dropped"]["items"] == {"missing_title": 1, "not_in_items_file": 1}


# ---------------------------------------------------------------------------------------- bad inputs


def _edit_csv(d: Path, file: str, line: int, text: str) -> None:
    lines = (d / file).read_text().splitlines()
    lines[line - 1] = text
    (d / file).write_text("\n".join(lines) + "\n")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


BAD = {
    # id: (route, edit(raw folder), extra argv, file, line, message after "column")
    "column_missing": (
        "csv",
        lambda d: _edit_csv(d, "inter.csv", 1, "user_id,item_id,time"),
        (),
        "inter.csv",
        1,
        "column 'timestamp' is not in the file (its columns: user_id, item_id, time); name the right one with --time-col",
    ),
    "column_missing_jsonl": (
        "jsonl",
        lambda d: _edit_csv(d, "inter.jsonl", 4, '{"uid": "2", "sku": "1"}'),
        (),
        "inter.jsonl",
        4,
        "column 'at' is not in the file (its columns: uid, sku); name the right one with --time-col",
    ),
    "duplicate_item_titles": (
        "csv",
        lambda d: _edit_csv(d, "items.csv", 5, "2,GoldenEye 2"),
        (),
        "items.csv",
        5,
        "column 'title': item id '2' is listed twice with different titles ('GoldenEye' on line 3, 'GoldenEye 2' here)",
    ),
    "empty_title_column": (
        "csv",
        lambda d: write_csv(d / "items.csv", ["item_id", "title"], [(i, " ") for i, _ in ITEMS]),
        (),
        "items.csv",
        2,
        "column 'title' is empty in every row (6 rows): the items need titles; name the title column with --title-col",
    ),
    "mixed_time_units": (
        "csv",
        lambda d: _edit_csv(d, "inter.csv", 6, "2,3,1600000250000"),
        (),
        "inter.csv",
        6,
        "column 'timestamp': mixed time units: line 2 holds seconds, this line milliseconds ('1600000250000'); one column holds one unit",
    ),
    "ms_declared_seconds_given": (
        "csv",
        lambda d: None,
        ("--time-unit", "ms"),
        "inter.csv",
        2,
        "column 'timestamp': '1600000100' looks like seconds, not milliseconds (leave out --time-unit ms)",
    ),
    "numbers_and_dates": (
        "csv",
        lambda d: _edit_csv(d, "inter.csv", 3, "1,2,2020-09-13T12:28:20"),
        (),
        "inter.csv",
        3,
        "column 'timestamp': mixed time units: line 2 holds seconds, this line ISO-8601 dates ('2020-09-13T12:28:20'); one column holds one unit",
    ),
    "other_delimiter": (
        "csv",
        lambda d: write_csv(
            d / "inter.csv", ["user_id", "item_id", "timestamp"], [(u, i, t) for u, i, _, t in RATINGS], ";"
        ),
        (),
        "inter.csv",
        1,
        "column 1: the header 'user_id;item_id;timestamp' holds no ',' but ';': the file is ';'-separated, not ','-separated as declared; pass --sep ';' (or the right --format)",
    ),
    "recbole_header_without_types": (
        "recbole",
        lambda d: _edit_csv(d, "shop.inter", 1, "user_id:token\titem_id:token\trating\ttimestamp:float"),
        (),
        "shop.inter",
        1,
        "column 3 ('rating') of the RecBole atomic header has no :type (expected name:type, type one of float, float_seq, token, token_seq): 'user_id:token\\titem_id:token\\trating\\ttimestamp:float'",
    ),
    "review_2023_without_parent_asin": (
        "amazon2023",
        lambda d: _edit_csv(
            d, "Toys_and_Games.jsonl", 3, '{"user_id": "1", "asin": "A2", "timestamp": 1600000100000}'
        ),
        (),
        "Toys_and_Games.jsonl",
        3,
        "column 'parent_asin': the review has no parent_asin (its fields: user_id, asin, timestamp)",
    ),
    "gzip_ends_early": (
        "amazon2023.gz",
        lambda d: _truncate(d / "Toys_and_Games.jsonl.gz"),
        (),
        "Toys_and_Games.jsonl.gz",
        None,
        "the file breaks off after line",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_naming_file_line_and_column(tmp_path, capsys, case):
    route, edit, extra, file, line, message = BAD[case]
    argv = write_route(tmp_path / "raw", route)
    edit(tmp_path / "raw")
    assert run(route, argv, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    where = f"error: {tmp_path / 'raw' / file}:"
    if line is None:  # the line where the gzip stream breaks off depends on zlib's buffering
        assert err[0].startswith(where) and message in err[0] and "Compressed file ended" in err[0]
    else:
        assert err[0] == f"{where}{line}: {message}"
    assert not (tmp_path / "out").exists()


def test_recbole_named_fields_and_parquet_timestamps(tmp_path, reference):
    # A Yelp-like RecBole dataset: business_id items, a "name" title, a date field.
    d = tmp_path / "yelp"
    d.mkdir()
    rows = "".join(f"r{k}\t{u}\t{i}\t{t}\n" for k, (u, i, _, t) in enumerate(RATINGS))
    (d / "yelp.inter").write_text("review_id:token\tuser_id:token\tbusiness_id:token\tdate:float\n" + rows)
    items = "".join(f"{i}\t{t}\n" for i, t in ITEMS)
    (d / "yelp.item").write_text("business_id:token\tname:token_seq\n" + items)
    fields = ["--item-field", "business_id", "--time-field", "date", "--title-field", "name"]
    assert recbole.main(["--input", str(d), "--output", str(tmp_path / "a"), *fields]) == 0
    # Parquet timestamp columns (naive: UTC, counted) instead of numbers.
    frame = pd.DataFrame(
        [(u, i, pd.Timestamp(t, unit="s")) for u, i, _, t in RATINGS],
        columns=["user_id", "item_id", "timestamp"],
    )
    frame.to_parquet(tmp_path / "i.parquet")
    pd.DataFrame(ITEMS, columns=["item_id", "title"]).to_parquet(tmp_path / "t.parquet")
    stats = interactions.prepare(tmp_path / "i.parquet", tmp_path / "t.parquet", tmp_path / "b")
    assert stats["times"]["naive_dates_read_as_utc"] == 13
    for out in ("a", "b"):
        for name in SAME:
            assert (tmp_path / out / name).read_bytes() == (reference["d3"] / name).read_bytes(), (out, name)


def test_a_delimiter_of_more_than_one_character_is_one_sentence(tmp_path, capsys):
    """--sep is one character (pandas' parser would stop with a TypeError traceback); `\\t` typed out is a tab."""
    argv = write_route(tmp_path / "raw", "csv")
    with pytest.raises(SystemExit) as stop:
        run("csv", argv, tmp_path / "out", "--sep", ";;")
    assert stop.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("error: argument --sep: a delimiter is one character, got ';;'")
    )
    assert not (tmp_path / "out").exists()
    assert run("csv", argv, tmp_path / "out", "--sep", ",") == 0
