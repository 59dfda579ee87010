"""Nothing lost, nothing silent: data prep and the loader against hostile-but-fair inputs and environments.

Every case asserts the exact outcome: the exit code of ``python -m data_prep.<source>`` (its ``main``), the
one sentence it prints, that an earlier output is untouched (its files still match its stats.json) and
that the loader accepts it, or which rows were dropped and counted. Two cases run the prep as a real
subprocess (killed mid-write; a second run while the first holds the lock). Full-disk and read-only
cases use a real 64 KiB tmpfs where this process may mount one (root in a container), else they
simulate the OSError where the write would fail.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from data_prep import amazon, assets, movielens
from data_prep import output as common
from data_prep.output import PAUSE_ENV
from data_prep.parsing import DataPrepError
from data_prep.protocols import ProtocolConfig
from iamrec.data import DataFileError, load_items, load_samples
from iamrec.data import dataset as loader
from tests.conftest import write_processed, write_stats

ROOT = Path(__file__).resolve().parents[1]
RAW = Path(__file__).parent / "fixtures" / "raw"
OUTPUTS = ("items.parquet", "users.parquet", "interactions.parquet", "samples.parquet")
RERUN = "re-run its data prep (e.g. `make data-ml100k`)."


# ------------------------------------------------------------------------------------------ helpers


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def verify(folder: Path) -> dict:
    """The folder is one whole data prep output: every file matches stats.json; the loader accepts it."""
    stats = json.loads((folder / "stats.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*OUTPUTS, "stats.json"])
    for name, info in stats["files"]["outputs"].items():
        data = (folder / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (info["sha256"], info["bytes"]), name
    samples = load_samples(folder)
    assert len(samples) == stats["samples"]["total"]
    return stats


def siblings(folder: Path) -> list[str]:
    """Everything next to the output folder other than the folder itself (locks, temporary folders)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def ml(capsys, *argv: str) -> tuple[int, str, list[str]]:
    rc = movielens.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def az(capsys, *argv: str) -> tuple[int, str, list[str]]:
    rc = amazon.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def copy_raw(tmp_path: Path, name: str) -> Path:
    d = tmp_path / f"raw-{name}"
    shutil.copytree(RAW / name, d)
    return d


def set_line(path: Path, line: int, text: str, encoding: str = "latin-1") -> None:
    lines = path.read_text(encoding=encoding).splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


@pytest.fixture
def old_output(tmp_path) -> Path:
    """An earlier, valid output (ML-1M fixture, loo) that failed runs must leave as it is."""
    out = tmp_path / "out" / "ml"
    movielens.prepare(RAW / "ml1m", out, cfg=ProtocolConfig(name="loo"))
    verify(out)
    return out


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "64k"):
    """A real tmpfs of `size` at `where`, or None where mounting is not allowed."""
    where.mkdir()
    try:
        ok = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
    except OSError:
        ok = None
    if ok is None or ok.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the prep exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_prep(out: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: str(pause), "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "data_prep.movielens",
        "--input",
        str(RAW / "ml100k_grouplens"),
        "--output",
        str(out),
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------ atomic outputs


def test_kill_mid_write_leaves_the_old_folder_whole_and_the_next_run_cleans_up(old_output, capsys):
    before = snapshot(old_output)
    proc = start_prep(old_output, pause=30)
    tmp = old_output.parent / f".ml.tmp-{proc.pid}"
    wait_for(lambda: (tmp / "items.parquet").is_file(), proc, "the first file in the temporary folder")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(old_output) == before  # items of the new run are only in the temporary folder
    assert verify(old_output)["protocol"]["name"] == "loo"
    assert siblings(old_output) == [".ml.lock", tmp.name]
    rc, out, err = ml(capsys, "--input", RAW / "ml100k_grouplens", "--output", old_output)
    assert rc == 0 and "wrote" in out
    lock = old_output.parent / ".ml.lock"
    assert err == [
        f"notice: {lock} was left by pid {proc.pid}, which stopped before it finished; taking the lock over",
        f"notice: removed {tmp}, left by a data prep that stopped before it finished",
        "warning: ml-100k: expected the published counts {'interactions': 100000, 'users': 943, 'items': 1682}, "
        "got {'interactions': 13, 'users': 3, 'items': 6}; this is not the full ml-100k",
    ]
    assert siblings(old_output) == [] and verify(old_output)["protocol"]["name"] == "d3"


def test_second_run_while_the_first_holds_the_lock_stops_at_once(old_output, capsys):
    before = snapshot(old_output)
    proc = start_prep(old_output, pause=0.3)
    lock = old_output.parent / ".ml.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(proc.pid), proc, "the lock")
    rc, out, err = ml(capsys, "--input", RAW / "ml1m", "--output", old_output)
    assert rc == 2 and out == ""
    assert err == [
        f"error: {old_output}: another data prep (pid {proc.pid}) is writing this folder (lock .ml.lock); "
        "wait for it to finish, then rerun"
    ]
    assert snapshot(old_output) == before
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "wrote" in stdout
    assert verify(old_output)["source"]["format"] == "grouplens-100k" and siblings(old_output) == []


def test_lock_left_by_a_dead_pid_is_taken_over_with_a_notice(old_output, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (old_output.parent / ".ml.lock").write_text(f"{dead.pid}\n")
    rc, _, err = ml(capsys, "--input", RAW / "ml1m", "--output", old_output)
    assert rc == 0
    assert err[0] == (
        f"notice: {old_output.parent / '.ml.lock'} was left by pid {dead.pid}, which stopped before it "
        "finished; taking the lock over"
    )
    assert siblings(old_output) == [] and verify(old_output)["protocol"]["name"] == "d3"


def test_folder_set_aside_by_a_run_killed_between_two_renames_is_restored(old_output, capsys):
    aside = old_output.parent / ".ml.old-4242"
    old_output.rename(aside)  # where the rename fallback leaves it between "old aside" and "new in"
    with pytest.raises(DataPrepError, match="ratings file not found"):  # even a failing run restores it
        movielens.prepare(old_output.parent / "nowhere", old_output, fmt="grouplens-1m")
    assert capsys.readouterr().err.startswith(f"notice: restored {old_output} from .ml.old-4242")
    assert siblings(old_output) == [] and verify(old_output)["protocol"]["name"] == "loo"


def test_replacing_without_renameat2_leaves_no_mix_and_no_leftovers(old_output, monkeypatch):
    monkeypatch.setattr(common, "_exchange", lambda a, b: False)
    stats = movielens.prepare(RAW / "ml100k_recbole", old_output)
    assert verify(old_output) == stats and stats["protocol"]["name"] == "d3" and siblings(old_output) == []


def test_rerun_replaces_the_folder_whole_and_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    movielens.prepare(RAW / "ml1m", a, cfg=ProtocolConfig(name="loo"))
    movielens.prepare(RAW / "ml1m", a)  # over the loo output
    movielens.prepare(RAW / "ml1m", b)
    assert snapshot(a) == snapshot(b) and verify(a)["protocol"]["name"] == "d3"


def test_symlinked_output_replaces_the_target_and_keeps_the_link(old_output):
    link = old_output.parent / "link"
    link.symlink_to(old_output.name)
    movielens.prepare(RAW / "ml100k_grouplens", link)
    assert link.is_symlink() and verify(link)["protocol"]["name"] == "d3"


# ------------------------------------------------------------------------- the output path


def test_output_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("keep me\n")
    rc, out, err = ml(capsys, "--input", RAW / "ml1m", "--output", f)
    assert (rc, out) == (2, "") and f.read_text() == "keep me\n"
    assert err == [
        f"error: {f}: the output path is a file, not a folder; give --output a new folder or an earlier "
        "data prep output"
    ]


def test_output_folder_with_foreign_files_is_not_replaced(tmp_path, capsys):
    d = copy_raw(tmp_path, "ml1m")  # e.g. --output pointing at the raw folder itself
    before = snapshot(d)
    rc, _, err = ml(capsys, "--input", d, "--output", d)
    assert rc == 2 and snapshot(d) == before
    assert err == [
        f"error: {d}: the output folder holds 'movies.dat' and 1 more, which no data prep writes; give "
        "--output a new folder or an earlier data prep output (it is replaced whole)"
    ]


def test_output_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, _, err = ml(capsys, "--input", RAW / "ml1m", "--output", tmp_path / "f" / "out")
    assert rc == 2
    assert err == [
        f"error: {tmp_path / 'f' / 'out'}: cannot write {tmp_path / 'f' / '.out.lock'} (Not a directory); "
        "nothing was changed"
    ]


def test_failed_run_leaves_no_new_parent_folders(tmp_path, capsys):
    d = copy_raw(tmp_path, "ml1m")
    set_line(d / "ratings.dat", 2, "1::2::3::notatime")
    rc, _, err = ml(capsys, "--input", d, "--output", tmp_path / "new" / "deeper" / "out")
    assert rc == 2 and err == [f"error: {d / 'ratings.dat'}:2: timestamp is not a number: 'notatime'"]
    assert not (tmp_path / "new").exists()


def test_full_disk_leaves_the_old_output_whole(tmp_path, capsys, monkeypatch):
    with tiny_tmpfs(tmp_path / "fs") as fs:
        if fs is None:  # simulate: the disk fills while the second file is written
            out = tmp_path / "out" / "ml"
            movielens.prepare(RAW / "ml1m", out, cfg=ProtocolConfig(name="loo"))
            calls = []

            def fsync(fd, real=os.fsync):
                calls.append(fd)
                if len(calls) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
                real(fd)

            monkeypatch.setattr(common.os, "fsync", fsync)
        else:
            out = fs / "ml"
            movielens.prepare(RAW / "ml1m", out, cfg=ProtocolConfig(name="loo"))
            free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
            (fs / ".ml.filler").write_bytes(b"\0" * (free - 8192))  # room for two pages, not a whole output
        capsys.readouterr()
        before = snapshot(out)
        rc, _, err = ml(capsys, "--input", RAW / "ml100k_grouplens", "--output", out)
        assert rc == 2 and len(err) == 2 and err[0].startswith("warning: ml-100k")
        assert err[1].startswith(f"error: {out}: cannot write ") and err[1].endswith(
            "(No space left on device); nothing was changed"
        )
        assert snapshot(out) == before and verify(out)["protocol"]["name"] == "loo"
        assert [n for n in siblings(out) if n != ".ml.filler"] == []


def test_read_only_folder(tmp_path, capsys, monkeypatch):
    with tiny_tmpfs(tmp_path / "fs") as fs:
        parent = fs if fs is not None else tmp_path / "ro"
        out = parent / "ml"
        movielens.prepare(RAW / "ml1m", out, cfg=ProtocolConfig(name="loo"))
        capsys.readouterr()
        before = snapshot(out)
        if fs is not None and subprocess.run(["mount", "-o", "remount,ro", str(fs)]).returncode == 0:
            pass
        else:  # simulate: the lock file is the first thing written

            def acquire(self):
                raise OSError(errno.EROFS, "Read-only file system", str(self.path))

            monkeypatch.setattr(common._OutputLock, "acquire", acquire)
        rc, _, err = ml(capsys, "--input", RAW / "ml1m", "--output", out)
        assert rc == 2
        assert err == [
            f"error: {out}: cannot write {parent / '.ml.lock'} (Read-only file system); nothing was changed"
        ]
        assert snapshot(out) == before


def test_empty_split_is_refused_before_anything_is_written(tmp_path, capsys):
    d = tmp_path / "raw"
    d.mkdir()
    shutil.copy(RAW / "ml100k_grouplens" / "u.item", d / "u.item")
    (d / "u.data").write_text("1\t1\t3\t100\n1\t2\t3\t200\n2\t1\t3\t300\n2\t3\t3\t400\n")  # 2 samples
    out = tmp_path / "new" / "out"
    rc, _, err = ml(capsys, "--input", d, "--output", out)
    assert rc == 2 and not (tmp_path / "new").exists()
    assert err[-1] == (
        f"error: {out}: the valid split would be empty (2 samples: train 1, valid 0, test 1); use more data "
        "or fewer filters, nothing was written"
    )


# --------------------------------------------------------------------------------- the loader


@pytest.fixture
def prepped(tmp_path) -> Path:
    out = tmp_path / "p"
    movielens.prepare(RAW / "ml100k_grouplens", out)
    return out


def test_mixed_folder_is_refused(prepped, tmp_path):
    other = tmp_path / "other"
    movielens.prepare(RAW / "ml1m", other, cfg=ProtocolConfig(name="loo"))
    shutil.copy(other / "samples.parquet", prepped / "samples.parquet")  # samples of another run
    with pytest.raises(DataFileError) as e:
        load_items(prepped)  # the whole folder is refused, whichever file is asked for
    with pytest.raises(DataFileError) as e2:
        load_samples(prepped)
    assert (
        str(e.value)
        == str(e2.value)
        == (
            f"{prepped / 'samples.parquet'} does not match the sha256 recorded in {prepped / 'stats.json'} (the "
            f"folder mixes files of different data prep runs, or the file was changed since); {RERUN}"
        )
    )


def test_truncated_file_is_refused_naming_it(prepped):
    f = prepped / "items.parquet"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataFileError, match=r"items\.parquet does not match the sha256 recorded in"):
        load_items(prepped)
    write_stats(prepped)  # even a stats.json that vouches for the truncated file: named, no bare Arrow error
    with pytest.raises(DataFileError) as e:
        load_items(prepped)
    assert str(e.value).startswith(f"{f} cannot be read as parquet (") and str(e.value).endswith(RERUN)


def test_missing_or_hashless_stats_json_is_refused(prepped):
    stats = prepped / "stats.json"
    stats.write_text('{"samples": {}}\n')
    with pytest.raises(DataFileError) as e:
        load_items(prepped)
    assert str(e.value) == (
        f"{stats} lists no sha256 for items.parquet and samples.parquet, so the files in {prepped} cannot be "
        f"checked; {RERUN}"
    )
    stats.unlink()
    with pytest.raises(DataFileError) as e:
        load_samples(prepped)
    assert str(e.value) == f"{stats} is missing, so the files in {prepped} cannot be checked; {RERUN}"


@pytest.mark.parametrize(
    ("file", "column", "expected"),
    [
        ("items.parquet", "item_id", "double, expected int64"),
        ("samples.parquet", "target", "double, expected int64"),
        ("samples.parquet", "target_timestamp", "double, expected int64"),
        ("samples.parquet", "history", "list<element: double>, expected list<int64>"),
    ],
)
def test_float_ids_are_refused_not_truncated(tmp_path, file, column, expected):
    d = write_processed(tmp_path / "d")
    df = pd.read_parquet(d / file)
    if column == "history":
        df[column] = df[column].map(lambda h: [x + 0.5 for x in h])
    else:
        df[column] = df[column].astype("float64") + 0.5
    df.to_parquet(d / file, index=False)
    write_stats(d)  # stats.json vouches for the file: the type check must catch it
    with pytest.raises(DataFileError) as e:
        load_samples(d)
    assert str(e.value) == (
        f"{d / file}: column '{column}' is {expected} (ids and times are never floats); {RERUN}"
    )


def test_null_item_in_a_history_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = write_processed(tmp_path / "d")
    table = pq.read_table(d / "samples.parquet")
    history = table.column("history").to_pylist()
    history[0] = [None]
    i = table.schema.get_field_index("history")
    pq.write_table(
        table.set_column(i, "history", pa.array(history, pa.list_(pa.int64()))), d / "samples.parquet"
    )
    write_stats(d)
    with pytest.raises(DataFileError, match=r"samples\.parquet: column 'history' has missing item ids\.$"):
        load_samples(d)


def test_hashes_are_checked_once_per_file_version(tmp_path, monkeypatch):
    d = write_processed(tmp_path / "d")
    calls: list[str] = []
    real = loader._sha256
    monkeypatch.setattr(loader, "_sha256", lambda p: calls.append(p.name) or real(p))
    load_samples(d)  # load_items + load_samples: each file hashed once
    load_samples(d)
    assert sorted(calls) == ["interactions.parquet", "items.parquet", "samples.parquet"]
    os.utime(d / "items.parquet", ns=(1, 1))  # a new mtime: hashed again
    load_items(d)
    assert calls[-1] == "items.parquet" and len(calls) == 4


# ------------------------------------------------------------------------ strict inputs: MovieLens


def test_utf8_bom_is_not_part_of_the_first_user_id(tmp_path):
    d = copy_raw(tmp_path, "ml100k_grouplens")
    (d / "u.data").write_bytes(b"\xef\xbb\xbf" + (d / "u.data").read_bytes())
    stats = movielens.prepare(d, tmp_path / "bom")
    movielens.prepare(RAW / "ml100k_grouplens", tmp_path / "plain")
    assert pd.read_parquet(tmp_path / "bom" / "users.parquet")["raw_user_id"].tolist() == ["1", "2", "3"]
    for f in OUTPUTS:
        assert (tmp_path / "bom" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f
    assert stats["files"]["inputs"]["u.data"]["encoding"] == "utf-8-sig"


def test_utf8_item_file_is_not_read_as_latin1(tmp_path):
    d = copy_raw(tmp_path, "ml100k_grouplens")
    text = (d / "u.item").read_text(encoding="latin-1")
    (d / "u.item").write_text(text, encoding="utf-8")  # re-saved as UTF-8 by an editor
    stats = movielens.prepare(d, tmp_path / "o")
    assert pd.read_parquet(tmp_path / "o" / "items.parquet")["title"][2] == "Misérables, Les (1995)"
    assert stats["files"]["inputs"]["u.item"]["encoding"] == "utf-8"
    plain = movielens.prepare(RAW / "ml100k_grouplens", tmp_path / "p")
    assert plain["files"]["inputs"]["u.item"]["encoding"] == "latin-1"  # the real GroupLens encoding


@pytest.mark.parametrize(
    ("encoding", "bom", "message"),
    [
        (
            "latin-1",
            True,
            "u.data:1: the file starts with a UTF-8 byte-order mark but is read as latin-1; "
            "pass --encoding utf-8 (or auto)",
        ),
        (
            "utf-8",
            False,
            "u.item:3: not valid utf-8 text at byte 6 of the line (invalid continuation byte); "
            "pass the file's --encoding",
        ),
        ("utf-16", False, "--encoding utf-16 is not supported; save the files as UTF-8"),
        ("klingon", False, "--encoding 'klingon' is not a known text encoding"),
    ],
)
def test_encoding_mismatches_are_one_sentence(tmp_path, capsys, encoding, bom, message):
    d = copy_raw(tmp_path, "ml100k_grouplens")
    if bom:
        (d / "u.data").write_bytes(b"\xef\xbb\xbf" + (d / "u.data").read_bytes())
    rc, _, err = ml(capsys, "--input", d, "--output", tmp_path / "o", "--encoding", encoding)
    assert rc == 2 and err[-1].startswith("error: ") and err[-1].endswith(message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "timestamp is not a number: 'nan'"),
        ("Infinity", "timestamp is not a number: 'Infinity'"),
        ("9007199254740993", "timestamp 9007199254740993 is not a time between 1970 and 2100 in seconds"),
        ("1e400", "timestamp is out of range: '1e400'"),
        (
            "978300100000",
            "timestamp 978300100000 is not a time between 1970 and 2100 in seconds (it looks "
            "like milliseconds; the files must hold seconds)",
        ),
        ("0", "timestamp 0 is not a time between 1970 and 2100 in seconds"),
        ("-5", "timestamp -5 is not a time between 1970 and 2100 in seconds"),
        ("978300100.5", "timestamp is not an integer: '978300100.5'"),
    ],
)
def test_bad_timestamps_stop_the_run_naming_the_line(tmp_path, capsys, value, message):
    d = copy_raw(tmp_path, "ml1m")
    set_line(d / "ratings.dat", 4, f"1::3::4::{value}")
    rc, _, err = ml(capsys, "--input", d, "--output", tmp_path / "o")
    assert rc == 2 and err == [f"error: {d / 'ratings.dat'}:4: {message}"]
    assert not (tmp_path / "o").exists()


def test_integral_decimal_timestamps_are_exact(tmp_path):
    d = copy_raw(tmp_path, "ml100k_recbole")
    lines = (d / "ml-100k.inter").read_text().splitlines()
    lines[1:] = [ln.rsplit("\t", 1)[0] + "\t" + ln.rsplit("\t", 1)[1] + ".0" for ln in lines[1:]]
    (d / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    movielens.prepare(d, tmp_path / "dec")
    movielens.prepare(RAW / "ml100k_recbole", tmp_path / "int")
    assert snapshot(tmp_path / "dec")["samples.parquet"] == snapshot(tmp_path / "int")["samples.parquet"]


def test_blank_and_null_user_ids_are_dropped_and_counted_not_merged(tmp_path, capsys):
    d = copy_raw(tmp_path, "ml100k_grouplens")
    with open(d / "u.data", "a") as f:
        f.write("\t4\t3\t300\n  \t5\t3\t301\nNULL\t1\t2\t302\n3\t\t1\t303\n")
    rc, out, _ = ml(capsys, "--input", d, "--output", tmp_path / "o")
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert rc == 0 and stats["dropped"]["lines"] == {"missing_item_id:u.data": 1, "missing_user_id:u.data": 3}
    assert stats["raw"]["users"] == 3 and stats["raw"]["interactions"] == 13
    assert "lines missing_item_id:u.data: 1, lines missing_user_id:u.data: 3" in out
    assert pd.read_parquet(tmp_path / "o" / "users.parquet")["raw_user_id"].tolist() == ["1", "2", "3"]


def test_a_file_of_only_blank_ids_is_fatal_naming_the_first_line(tmp_path, capsys):
    d = copy_raw(tmp_path, "ml1m")
    (d / "ratings.dat").write_text("::1::5::978300100\nnull::2::3::978300100\n")
    rc, _, err = ml(capsys, "--input", d, "--output", tmp_path / "o")
    assert rc == 2
    assert err == [f"error: {d / 'ratings.dat'}:1: no usable ratings: every user or item id is blank or null"]


# -------------------------------------------------------------------------- strict inputs: Amazon


def _review(t, user='"U9"', asin='"B001"') -> str:
    return f'{{"reviewerID": {user}, "asin": {asin}, "unixReviewTime": {t}}}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (_review("NaN"), "unixReviewTime is nan, not an integer"),
        (_review("-Infinity"), "unixReviewTime is -inf, not an integer"),
        (_review("1e300"), "unixReviewTime is out of range: '1E+300'"),
        (_review("1478908800.5"), "unixReviewTime is not an integer: '1478908800.5'"),
        (_review(str(10**30)), f"unixReviewTime is out of range: '{10**30}'"),
        (_review('"1478908800"'), "unixReviewTime is a str, not an integer: '1478908800'"),
        (_review("null"), "unixReviewTime is null, not an integer"),
        (_review("1478908800", user="1.5"), "reviewerID is a number with a fraction, not a string: '1.5'"),
        (_review("1478908800", asin='["B001"]'), "asin is a list, not a string: \"['B001']\""),
    ],
)
def test_amazon_bad_values_stop_the_run_naming_the_line(tmp_path, capsys, line, message):
    d = copy_raw(tmp_path, "amazon2018")
    set_line(d / "Toys_and_Games_5.json", 5, line, "utf-8")
    rc, _, err = az(capsys, "--input", d, "--output", tmp_path / "o")
    assert rc == 2 and err == [f"error: {d / 'Toys_and_Games_5.json'}:5: {message}"]
    assert not (tmp_path / "o").exists()


def test_amazon_exact_decimal_time_null_ids_and_non_list_categories(tmp_path, capsys):
    d = copy_raw(tmp_path, "amazon2018")
    reviews = d / "Toys_and_Games_5.json"
    first = json.loads(reviews.read_text().splitlines()[0])
    set_line(reviews, 1, _review(f"{first['unixReviewTime'] / 1e8}e8", user='"U1"'), "utf-8")  # same second
    with open(reviews, "a") as f:
        f.write(_review(1478908800, user="null") + "\n" + _review(1478908800, user='"  "') + "\n")
    meta = d / "meta_Toys_and_Games.json"
    set_line(
        meta, 1, json.dumps({"asin": "B001", "title": "LEGO Classic Bricks", "category": "Toys"}), "utf-8"
    )
    rc, out, _ = az(capsys, "--input", d, "--output", tmp_path / "o")
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert rc == 0 and stats["filtered"]["interactions"] == 30
    assert stats["dropped"]["lines"] == {
        "duplicate_meta_record": 1,
        "missing_user_id:Toys_and_Games_5.json": 2,
    }
    assert stats["dropped"]["values"] == {"categories_not_a_list:meta_Toys_and_Games.json": 1}
    assert "values categories_not_a_list:meta_Toys_and_Games.json: 1" in out
    items = pd.read_parquet(tmp_path / "o" / "items.parquet")
    assert items.loc[0, "categories"] == "" and items.loc[1, "categories"] == "Toys & Games > Puzzles"
    amazon.prepare(RAW / "amazon2018", tmp_path / "ref")
    ref = pd.read_parquet(tmp_path / "ref" / "interactions.parquet")
    assert pd.read_parquet(tmp_path / "o" / "interactions.parquet").equals(ref)  # 1.4789088e9 -> same second


def test_amazon_bom_and_undecodable_line(tmp_path, capsys):
    d = copy_raw(tmp_path, "amazon2018")
    reviews = d / "Toys_and_Games_5.json"
    reviews.write_bytes(b"\xef\xbb\xbf" + reviews.read_bytes())
    assert amazon.prepare(d, tmp_path / "o")["filtered"]["interactions"] == 30
    meta = d / "meta_Toys_and_Games.json"
    meta.write_bytes(meta.read_bytes().replace(b"LEGO Classic", b"LEGO Cl\xe4ssic"))  # latin-1 byte
    rc, _, err = az(capsys, "--input", d, "--output", tmp_path / "o")
    assert rc == 2 and err == [
        f"error: {meta}:1: not valid utf-8 text at byte 94 of the line (invalid continuation byte); "
        "pass the file's --encoding"
    ]
    assert verify(tmp_path / "o")["filtered"]["interactions"] == 30  # the earlier output is untouched


# ---------------------------------------------------------------------------------------- assets


def test_assets_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / "root").write_text("x")
    rc = assets.main(["--root", str(tmp_path / "root"), "--only", "ml100k"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {tmp_path / 'root'}: --root is a file, not a folder"]


def test_assets_full_disk_keeps_nothing_half_written(tmp_path, capsys, monkeypatch):
    from tests.test_data_prep_assets import fake_recbole_wheel

    wheel = fake_recbole_wheel(tmp_path / "wheels")
    monkeypatch.setitem(assets.WHEELS, "ml100k", wheel)

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assets.os, "fsync", fsync)
    rc = assets.main(
        ["--root", str(tmp_path / "a"), "--only", "ml100k", "--wheel-dir", str(tmp_path / "wheels")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"error: {tmp_path / 'a'}: No space left on device (nothing half-written was kept); fix that path or "
        "pass --root DIR, then rerun"
    ]
    assert list((tmp_path / "a" / "raw" / "ml-100k").iterdir()) == []
