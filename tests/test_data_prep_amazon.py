"""data_prep.amazon on the checked-in 2014 / 2018 fixtures (tests/fixtures/raw/amazon20{14,18}/).

Both fixtures: users U1..U6 each review B001..B005 (a 5-core), plus one review each of B006 (valid title,
one review: the 5-core removes it), B007 (HTML title), B008 (22-word title), B009 (no / empty title),
B010 (no metadata record), and U2 reviews B001 a second time (duplicate). B011 has metadata only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from data_prep import amazon
from data_prep.parsing import DataPrepError
from data_prep.protocols import ProtocolConfig

RAW = Path(__file__).parent / "fixtures" / "raw"
EXPECTED_DROPS = {
    "interactions": {
        "5_core": 1,
        "duplicate": 1,
        "html_title": 1,
        "long_title": 1,
        "missing_title": 1,
        "no_metadata": 1,
    },
    "items": {
        "html_title": 1,
        "long_title": 1,
        "missing_title": 1,
        "no_interactions_left": 1,
        "no_metadata": 1,
    },
}
TITLES = [
    "LEGO Classic Bricks",
    "Children's Jigsaw Puzzle",
    "Barbie & Ken Dolls",
    "Hot Wheels Track",
    "Play-Doh 4-Pack",
]


@pytest.mark.parametrize("year", ["2014", "2018"])
def test_each_format_parses_and_filters(tmp_path, year):
    stats = amazon.prepare(RAW / f"amazon{year}", tmp_path / "o", cfg=ProtocolConfig(k_core=5))
    assert stats["source"]["format"] == f"amazon-{year}"
    assert stats["raw"] == {"users": 6, "items": 10, "interactions": 36}
    assert stats["filtered"] == {"users": 6, "items": 5, "interactions": 30}
    assert {k: stats["dropped"][k] for k in ("items", "interactions")} == EXPECTED_DROPS
    if year == "2018":
        assert stats["dropped"]["lines"] == {"duplicate_meta_record": 1}
    assert stats["meta_records_not_reviewed"] == 1
    items = pd.read_parquet(tmp_path / "o" / "items.parquet")
    assert items["title"].tolist() == TITLES  # entities unescaped (2018: double-escaped), spaces collapsed
    assert items["raw_item_id"].tolist() == ["B001", "B002", "B003", "B004", "B005"]
    assert items["item_id"].tolist() == list(range(5))
    s = pd.read_parquet(tmp_path / "o" / "samples.parquet")
    assert stats["samples"] == {"train": 19, "valid": 2, "test": 3, "total": 24}
    assert all(t not in h for h, t in zip(s["history"], s["target"]))
    assert s["target_timestamp"].is_monotonic_increasing


def test_loo(tmp_path):
    amazon.prepare(RAW / "amazon2014", tmp_path / "o", cfg=ProtocolConfig(name="loo", k_core=5))
    s = pd.read_parquet(tmp_path / "o" / "samples.parquet")
    counts = s.groupby("user_id")["split"].value_counts().unstack()
    assert (counts["test"] == 1).all() and (counts["valid"] == 1).all() and (counts["train"] == 2).all()
    assert (s.loc[s["split"] == "test", "target"] == 4).all()  # everyone reviewed B005 last


def test_time_window(tmp_path):
    # The fixture's 2018 reviews start 2016-11-01; B00j by user k is on day 10j+k, extras on days 100-105.
    cfg = ProtocolConfig(k_core=4, start="2016-11-01", end="2016-12-21")
    stats = amazon.prepare(RAW / "amazon2018", tmp_path / "o", cfg=cfg)
    assert stats["dropped"]["interactions"] == {"out_of_window": 12}
    assert stats["filtered"] == {"users": 6, "items": 4, "interactions": 24}
    assert stats["protocol"]["start"] == "2016-11-01"


@pytest.mark.parametrize(
    "title,expect",
    [
        ("Barbie &amp;amp; Ken", ("Barbie & Ken", None)),
        ("<b>Bold</b> toy", ("<b>Bold</b> toy", "html_title")),
        ("&lt;br /&gt;Kite", ("<br />Kite", "html_title")),
        ("Tom & Jerry <3", ("Tom & Jerry <3", None)),
        (" ".join(["w"] * 20), (" ".join(["w"] * 20), None)),
        (" ".join(["w"] * 21), (" ".join(["w"] * 21), "long_title")),
        ("   ", (None, "missing_title")),
        (None, (None, "missing_title")),
        (["not", "a", "string"], (None, "missing_title")),
    ],
)
def test_clean_title(title, expect):
    assert amazon.clean_title(title) == expect


def test_rerun_is_byte_identical(tmp_path):
    for d in ("a", "b"):
        amazon.prepare(RAW / "amazon2014", tmp_path / d)
    for f in ("items.parquet", "users.parquet", "interactions.parquet", "samples.parquet", "stats.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_gzip_input_and_explicit_files(tmp_path):
    import gzip

    for f in (RAW / "amazon2018").iterdir():
        (tmp_path / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes(), mtime=0))
    stats = amazon.prepare(
        None,
        tmp_path / "o",
        reviews=tmp_path / "Toys_and_Games_5.json.gz",
        meta=tmp_path / "meta_Toys_and_Games.json.gz",
    )
    assert stats["filtered"]["interactions"] == 30


def test_cli(tmp_path, capsys):
    rc = amazon.main(["--input", str(RAW / "amazon2014"), "--output", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "train 19, valid 2, test 3" in out and "html_title: 1" in out
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["protocol"]["k_core"] == 5


BAD = [
    # (fixture, file, line, new text, words the message must hold)
    (
        "amazon2014",
        "reviews_Toys_and_Games_5.json",
        3,
        '{"reviewerID": "U3", "asin": "B001"',
        ["_5.json:3", "JSON"],
    ),
    (
        "amazon2014",
        "reviews_Toys_and_Games_5.json",
        2,
        '{"reviewerID": "U2", "asin": "B001"}',
        ["_5.json:2", "unixReviewTime"],
    ),
    (
        "amazon2018",
        "Toys_and_Games_5.json",
        4,
        '{"reviewerID": "U4", "asin": "B001", "unixReviewTime": "x"}',
        ["_5.json:4", "not an integer"],
    ),
    (
        "amazon2014",
        "meta_Toys_and_Games.json",
        2,
        "{'asin': 'B002', 'title': __import__('os')}",
        ["meta_Toys_and_Games.json:2", "Python dict"],
    ),
    ("amazon2018", "meta_Toys_and_Games.json", 3, "{'asin': 'B003'}", ["meta_Toys_and_Games.json:3", "JSON"]),
    (
        "amazon2018",
        "meta_Toys_and_Games.json",
        1,
        '{"title": "No asin"}',
        ["meta_Toys_and_Games.json:1", "no asin"],
    ),
    ("amazon2018", "meta_Toys_and_Games.json", 1, '["B001"]', ["meta_Toys_and_Games.json:1", "got list"]),
    ("amazon2018", "meta_Toys_and_Games.json", 0, "", ["meta_Toys_and_Games.json", "is empty"]),
]


@pytest.mark.parametrize("name,file,line,text,words", BAD, ids=[f"{b[0]}-{b[1][:6]}:{b[2]}" for b in BAD])
def test_bad_input_names_file_and_line(tmp_path, capsys, name, file, line, text, words):
    d = tmp_path / name
    shutil.copytree(RAW / name, d)
    if line == 0:
        (d / file).write_bytes(b"")
    else:
        lines = (d / file).read_text().splitlines()
        lines[line - 1] = text
        (d / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataPrepError) as e:
        amazon.prepare(d, tmp_path / "out")
    for w in words:
        assert w in str(e.value)
    rc = amazon.main(["--input", str(d), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(d / file) in err[0]


def test_ambiguous_directory(tmp_path):
    d = tmp_path / "two"
    shutil.copytree(RAW / "amazon2018", d)
    shutil.copy(d / "Toys_and_Games_5.json", d / "Toys_and_Games.json")
    with pytest.raises(DataPrepError, match="expected one reviews file"):
        amazon.prepare(d, tmp_path / "out")


def test_nothing_left_is_an_error(tmp_path):
    with pytest.raises(DataPrepError, match="no interactions left"):
        amazon.prepare(RAW / "amazon2014", tmp_path / "o", cfg=ProtocolConfig(k_core=7))
