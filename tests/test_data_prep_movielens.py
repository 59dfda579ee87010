"""data_prep.movielens + data_prep.common on the checked-in fixtures (tests/fixtures/raw/).

The three MovieLens fixtures hold the same 13 ratings of 3 users on 6 items (item 6 has the title
"unknown"), so every format must give the same hand-checked samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from data_prep import movielens
from data_prep.parsing import DataPrepError
from data_prep.protocols import ProtocolConfig

RAW = Path(__file__).parent / "fixtures" / "raw"
ML_DIRS = ["ml100k_grouplens", "ml1m", "ml100k_recbole"]
FORMATS = {"ml100k_grouplens": "grouplens-100k", "ml1m": "grouplens-1m", "ml100k_recbole": "recbole"}
OUTPUTS = ("items.parquet", "users.parquet", "interactions.parquet", "samples.parquet", "stats.json")

# d3 on the fixture, by hand: 9 targets sorted by (time, file order); cut at floor(7.2)=7, floor(8.1)=8.
# Raw item r -> dense r-1 (item 6 dropped), raw user u -> u-1. User 1 rates items 1 and 2 in the same
# second: file order puts 1 first.
D3_EXPECTED = [
    (0, [0], 1, "train"),
    (0, [0, 1], 2, "train"),
    (1, [0], 2, "train"),
    (0, [0, 1, 2], 3, "train"),
    (1, [0, 2], 4, "train"),
    (2, [1], 0, "train"),
    (1, [0, 2, 4], 3, "train"),
    (2, [1, 0], 3, "valid"),
    (2, [1, 0, 3], 4, "test"),
]


def prep(tmp_path, src="ml100k_grouplens", **cfg):
    out = tmp_path / f"out-{src}-{cfg.get('name', 'd3')}"
    stats = movielens.prepare(RAW / src, out, cfg=ProtocolConfig(**cfg))
    return out, stats, pd.read_parquet(out / "samples.parquet")


@pytest.mark.parametrize("name", ML_DIRS)
def test_each_format_parses_to_the_same_samples(tmp_path, name):
    assert movielens.detect_format(RAW / name) == FORMATS[name]
    out, stats, samples = prep(tmp_path, name)
    got = [
        (u, list(h), t, s)
        for u, h, t, s in samples[["user_id", "history", "target", "split"]].itertuples(False)
    ]
    assert got == D3_EXPECTED
    items = pd.read_parquet(out / "items.parquet")
    assert items["item_id"].tolist() == list(range(5))
    assert items["raw_item_id"].tolist() == ["1", "2", "3", "4", "5"]
    assert items["title"].iloc[0] == "Toy Story (1995)"
    assert items["title"].iloc[2] == "Misérables, Les (1995)"  # latin-1 (GroupLens) / UTF-8 (RecBole)
    assert items["title"].iloc[3] == "Usual Suspects, The (1995)"  # RecBole: year rebuilt
    assert stats["raw"] == {"users": 3, "items": 6, "interactions": 13}
    assert stats["filtered"] == {"users": 3, "items": 5, "interactions": 12}
    assert stats["dropped"]["items"] == {"missing_title": 1}
    assert stats["dropped"]["interactions"] == {"missing_title": 1}
    assert stats["samples"] == {"train": 7, "valid": 1, "test": 1, "total": 9}
    assert stats["known_counts"]["matches"] is False  # the fixture is named like ML-100K/1M, but tiny
    assert set(stats["files"]["inputs"]) and set(stats["files"]["outputs"]) == set(OUTPUTS[:-1])


def test_contract_dtypes(tmp_path):
    out, _, samples = prep(tmp_path)
    inter = pd.read_parquet(out / "interactions.parquet")
    assert list(inter.columns) == ["user_id", "item_id", "timestamp"]
    assert all(str(inter[c].dtype) == "int64" for c in inter.columns)
    assert list(samples.columns) == ["user_id", "history", "target", "target_timestamp", "split"]
    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "samples.parquet")
    assert str(schema.field("history").type) == "list<element: int64>"
    assert schema.metadata is None  # no pandas metadata: byte-identical reruns
    users = pd.read_parquet(out / "users.parquet")
    assert users["raw_user_id"].tolist() == ["1", "2", "3"]


def test_d3_time_order_and_no_target_in_history(tmp_path):
    _, stats, s = prep(tmp_path)
    assert all(t not in h for h, t in zip(s["history"], s["target"]))
    ts = {k: s.loc[s["split"] == k, "target_timestamp"] for k in ("train", "valid", "test")}
    assert ts["train"].max() <= ts["valid"].min() and ts["valid"].max() <= ts["test"].min()
    assert s["target_timestamp"].is_monotonic_increasing
    assert stats["d3_boundary_ties"] == {"train/valid": 0, "valid/test": 0}


def test_d3_boundary_tie_is_cut_by_file_order(tmp_path):
    # Ten users rate the same two items in the same seconds: 10 samples, all targets at t=5.
    d = tmp_path / "ties"
    d.mkdir()
    shutil.copy(RAW / "ml100k_grouplens" / "u.item", d / "u.item")
    (d / "u.data").write_text("".join(f"{u}\t1\t3\t1\n{u}\t2\t3\t5\n" for u in range(10, 0, -1)))
    stats = movielens.prepare(d, tmp_path / "out", cfg=ProtocolConfig())
    s = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    # File order lists user 10 first: the split follows file order, not user id.
    assert s["user_id"].tolist() == list(range(9, -1, -1))
    assert s["split"].tolist() == ["train"] * 8 + ["valid", "test"]
    assert stats["d3_boundary_ties"] == {"train/valid": 9, "valid/test": 2}


def test_loo_one_valid_one_test_per_user_last_is_test(tmp_path):
    out, stats, s = prep(tmp_path, "ml1m", name="loo")
    assert stats["protocol"]["max_history"] == 50
    per_user = s.groupby("user_id")["split"].value_counts().unstack(fill_value=0)
    assert (per_user["test"] == 1).all() and (per_user["valid"] == 1).all()
    inter = pd.read_parquet(out / "interactions.parquet")  # sorted by (user, time, file order)
    last = inter.groupby("user_id")["item_id"].last()
    second = inter.groupby("user_id")["item_id"].nth(-2).to_numpy()
    test = s[s["split"] == "test"].set_index("user_id")["target"]
    valid = s[s["split"] == "valid"]["target"].to_numpy()
    assert (test == last).all() and (valid == second).all()
    assert all(t not in h for h, t in zip(s["history"], s["target"]))
    # User 0 (raw 1): items 1,2 (same second, file order), 3, 4 -> train 1, valid 2, test 3.
    u0 = s[s["user_id"] == 0]
    assert [list(h) for h in u0["history"]] == [[0], [0, 1], [0, 1, 2]]
    assert u0["split"].tolist() == ["train", "valid", "test"]


def test_max_history_and_min_rating(tmp_path):
    _, stats, s = prep(tmp_path, max_history=1, min_rating=3)
    assert s["history"].map(len).max() == 1
    assert stats["dropped"]["interactions"] == {"below_min_rating": 3, "missing_title": 1}
    assert stats["filtered"]["interactions"] == 9


def test_rerun_is_byte_identical(tmp_path):
    a = movielens.prepare(RAW / "ml100k_recbole", tmp_path / "a", cfg=ProtocolConfig())
    b = movielens.prepare(RAW / "ml100k_recbole", tmp_path / "b", cfg=ProtocolConfig())
    assert a == b
    for f in OUTPUTS:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert json.loads((tmp_path / "a" / "stats.json").read_text()) == a


def test_cli_prints_summary(tmp_path, capsys):
    rc = movielens.main(["--input", str(RAW / "ml1m"), "--output", str(tmp_path / "o"), "--protocol", "loo"])
    out = capsys.readouterr().out
    assert rc == 0 and "train 3, valid 3, test 3" in out and "missing_title: 1" in out


# ---------------------------------------------------------------------------- bad inputs


def _copy(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(RAW / name, d)
    return d


def _edit(path: Path, line: int, text: str | None, encoding="latin-1"):
    lines = path.read_text(encoding=encoding).splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


BAD = [
    # (fixture dir, file, 1-based line, new text or "" for an empty file, expected words in the message)
    ("ml100k_grouplens", "u.data", 4, "1\t3\t4", ["u.data:4", "expected 4"]),
    ("ml100k_grouplens", "u.data", 2, "1\t2\tthree\t100", ["u.data:2", "rating is not a number"]),
    ("ml100k_grouplens", "u.data", 5, "2\t99\t2\t250", ["u.data:5", "'99' is not in the item file"]),
    ("ml100k_grouplens", "u.data", 1, "1,1,5,100", ["u.data:1", "expected 4"]),
    ("ml100k_grouplens", "u.item", 0, "", ["u.item", "is empty"]),
    ("ml100k_grouplens", "u.item", 2, "2|GoldenEye (1995)", ["u.item:2", "expected 24"]),
    ("ml1m", "ratings.dat", 3, "2::1::4", ["ratings.dat:3", "expected 4"]),
    ("ml1m", "movies.dat", 1, "2::Duplicate (1995)::Drama", ["movies.dat:2", "listed twice"]),
    (
        "ml100k_recbole",
        "ml-100k.inter",
        1,
        "user\titem\trating\ttime",
        ["ml-100k.inter:1", "RecBole atomic header"],
    ),
    ("ml100k_recbole", "ml-100k.inter", 3, "1\t2\t3", ["ml-100k.inter:3", "expected 4"]),
    ("ml100k_recbole", "ml-100k.inter", 4, "2\t1\t4\tyesterday", ["ml-100k.inter:4", "timestamp"]),
]


@pytest.mark.parametrize("name,file,line,text,words", BAD, ids=[f"{b[1]}:{b[2]}" for b in BAD])
def test_bad_input_names_file_and_line(tmp_path, capsys, name, file, line, text, words):
    d = _copy(tmp_path, name)
    if line == 0:
        (d / file).write_bytes(b"")
    else:
        _edit(d / file, line, text, "utf-8" if name.endswith("recbole") else "latin-1")
    with pytest.raises(DataPrepError) as e:
        movielens.prepare(d, tmp_path / "out")
    for w in words:
        assert w in str(e.value)
    rc = movielens.main(["--input", str(d), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and str(d / file) in err[-1]


def test_unknown_directory_layout(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataPrepError, match="no MovieLens files found"):
        movielens.prepare(tmp_path, tmp_path / "out")
    with pytest.raises(DataPrepError, match="input directory not found"):
        movielens.prepare(tmp_path / "missing", tmp_path / "out")


def test_strict_counts(tmp_path):
    with pytest.raises(DataPrepError, match="published counts"):
        movielens.prepare(RAW / "ml100k_grouplens", tmp_path / "o", strict_counts=True)


@pytest.mark.slow
def test_real_ml100k(tmp_path):
    raw = Path(".assets/raw/ml-100k")
    if not raw.is_dir():
        pytest.skip("run `python -m data_prep.assets --only ml100k` first")
    stats = movielens.prepare(raw, tmp_path / "ml100k", cfg=ProtocolConfig(), strict_counts=True)
    assert stats["raw"] == {"users": 943, "items": 1682, "interactions": 100_000}
    assert stats["dropped"]["interactions"] == {"missing_title": 9}  # item 267 "unknown"
    assert stats["samples"]["total"] == 100_000 - 9 - 943
