"""Issue 20 (1-3) and 18 (2): archives are untrusted input, one runs folder has one writer, a stopped
`reproduce` leaves no stage behind, and the numbers on the command lines mean something.

Every archive is built here with `tarfile` (no fit runs); every refusal pins the exit status, the one
sentence naming the archive and the field or member, and that no file anywhere was written or lost.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from iamrec import reproduce as rp
from iamrec import session
from iamrec.tables import archive as packing
from iamrec.tables import unpack, writer
from iamrec.tables.plan import TableRun

REPO = Path(__file__).resolve().parents[1]
SEED = "results/runs/tiny/table2/ml100k/iam/seed0"
METRICS = {
    "HR@5": 0.2,
    "HR@10": 0.3,
    "HR@20": 0.4,
    "NDCG@5": 0.1,
    "NDCG@10": 0.15,
    "NDCG@20": 0.2,
    "users": 2,
}


def _parquet() -> bytes:
    frame = pd.DataFrame({"sample_index": [0, 1], "user_id": [0, 1], "target": [1, 2], "rank": [0, -1]})
    buf = io.BytesIO()
    frame.to_parquet(buf)
    return buf.getvalue()


PREDICTIONS = _parquet()


@pytest.fixture
def ws(tmp_path: Path, monkeypatch) -> Path:
    """A working folder (the repository root to a merge) with the real configs; the tests write nothing
    above it, and `files()` of `tmp_path` sees everything they could have written."""
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.chdir(root)
    (root / "configs").symlink_to(REPO / "configs")
    monkeypatch.delenv("IAMREC_DEBUG", raising=False)
    return root


def files(top: Path) -> dict[str, bytes]:
    """Every file under `top` (not following links) with its bytes: what was written or lost."""
    out = {}
    for folder, _dirs, names in os.walk(top):
        for name in names:
            path = Path(folder) / name
            out[str(path.relative_to(top))] = b"<link>" if path.is_symlink() else path.read_bytes()
    return out


def manifest(**changes) -> dict:
    base = {
        "format": 1,
        "profile": "tiny",
        "tables": ["table2"],
        "datasets": ["ml100k"],
        "seeds": [0],
        "created": "2026-12-01 10:00:00",
        "gpu": [],
        "session_dir": "results/runs/sessions/s1",
        "runs": [{"table": "table2", "dataset": "ml100k", "method": "iam", "seed": 0, "path": SEED}],
    }
    return {**base, **changes}


def seed_files(prefix: str = SEED, hr10: float = 0.3) -> dict[str, bytes]:
    return {
        f"{prefix}/DONE": json.dumps({"profile": "tiny", "seconds": 3.0}).encode(),
        f"{prefix}/test_metrics.json": json.dumps({**METRICS, "HR@10": hr10}).encode(),
        f"{prefix}/predictions.parquet": PREDICTIONS,
        f"{prefix}/lightning_logs/version_0/hparams.yaml": b"lr: 0.001\n",
    }


def build(path: Path, man: dict | bytes | None = None, members: dict | None = None, extra=()) -> Path:
    """A session archive: the manifest (a dict, raw bytes, or None for none), regular members, then
    `extra` (TarInfo, bytes or None) members as given."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        if man is not None:
            data = man if isinstance(man, bytes) else json.dumps(man).encode()
            info = tarfile.TarInfo(packing.MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, data in (seed_files() if members is None else members).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


def merge_cli(*archives: str, capsys) -> tuple[int, str, str]:
    try:
        session.main(["merge", *archives])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def info(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    return member


class Zeros(io.RawIOBase):
    """`n` zero bytes, read in chunks (a bomb's member without holding it in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def _bad_path(field: str, value) -> dict:
    run = {"table": "table2", "dataset": "ml100k", "method": "iam", "seed": 0, "path": SEED, field: value}
    return manifest(runs=[run])


# ------------------------------------------------------------------------------- 1. untrusted archives

REFUSED = {
    # path traversal through each manifest field, and absolute paths
    "profile-traversal": (manifest(profile="../../../outside"), None, "manifest field profile"),
    "profile-absolute": (manifest(profile="/tmp/outside"), None, "manifest field profile"),
    "profile-unknown": (
        manifest(profile="nope"),
        None,
        'manifest field profile is "nope", not a known profile',
    ),
    "tables-traversal": (manifest(tables=["../../outside"]), None, "manifest field tables"),
    "datasets-traversal": (
        manifest(datasets=["../../../outside"], runs=[]),
        None,
        'manifest field datasets is ["../../../outside"]',
    ),
    "datasets-dotdot": (manifest(datasets=[".."], runs=[]), None, "manifest field datasets"),
    "run-table": (_bad_path("table", ".."), None, "manifest field runs[0].table"),
    "run-dataset": (_bad_path("dataset", "../../../outside"), None, "manifest field runs[0].dataset"),
    "run-method": (_bad_path("method", "../../outside"), None, "manifest field runs[0].method"),
    "run-seed-negative": (_bad_path("seed", -1), None, "manifest field runs[0].seed is -1"),
    "run-seed-path": (_bad_path("seed", "0/../../x"), None, "manifest field runs[0].seed"),
    "run-path-absolute": (_bad_path("path", "/tmp/ml100k/iam/seed0"), None, "manifest field runs[0].path"),
    "run-path-dotdot": (_bad_path("path", "../../ml100k/iam/seed0"), None, "manifest field runs[0].path"),
    "session-dir-dotdot": (manifest(session_dir="../../outside"), None, "manifest field session_dir"),
    "session-dir-absolute": (manifest(session_dir="/tmp/outside"), None, "manifest field session_dir"),
    "seeds": (manifest(seeds=[-1]), None, "manifest field seeds"),
    # member names
    "member-dotdot": (
        manifest(),
        {**seed_files(), f"{SEED}/../../../../../../../../outside": b"x"},
        "member ",
    ),
    "member-absolute": (manifest(), {**seed_files(), "/tmp/outside": b"x"}, "is an absolute path"),
    "member-file-and-folder": (
        manifest(),
        {**seed_files(), f"{SEED}/DONE/x": b"x"},
        "is a file and a folder",
    ),
    # one cell-seed listed twice in one archive: refused like a conflict
    "duplicate-cell-seed": (
        manifest(
            runs=[
                {"table": "table2", "dataset": "ml100k", "method": "iam", "seed": 0, "path": SEED},
                {
                    "table": "table2",
                    "dataset": "ml100k",
                    "method": "iam",
                    "seed": 0,
                    "path": "b/ml100k/iam/seed0",
                },
            ]
        ),
        {**seed_files(), **seed_files("b/ml100k/iam/seed0", hr10=0.9)},
        "it lists tiny/table2/ml100k/iam/seed0 twice",
    ),
    # malformed manifests
    "manifest-not-json": (b"{not json", None, "its iamrec-session.json is not JSON"),
    "manifest-a-list": (b"[1, 2]", None, "is not a JSON object"),
    "manifest-missing-keys": (
        json.dumps({"profile": "tiny"}).encode(),
        None,
        "lacks tables, datasets, seeds, runs",
    ),
    "manifest-absent": (None, None, "has no iamrec-session.json"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_hostile_archive_is_refused_whole_before_a_byte_is_written(case, ws: Path, tmp_path: Path, capsys):
    man, members, said = REFUSED[case]
    build(ws / "a.tar.gz", man, members)
    Path("results/runs/tiny/table2/ml100k/causal/seed0").mkdir(parents=True)  # what is there stays
    Path("results/runs/tiny/table2/ml100k/causal/seed0/DONE").write_text("{}")
    before = files(tmp_path)
    code, out, err = merge_cli("a.tar.gz", capsys=capsys)
    assert code == 2 and out == ""
    assert err.startswith("iamrec.session: error: a.tar.gz ") and err.count("\n") == 1, err
    assert said in err and "nothing of it was unpacked" in err
    assert files(tmp_path) == before  # nothing written (outside the target or in it), nothing lost


def test_special_members_are_refused(ws: Path, tmp_path: Path, capsys) -> None:
    """Symbolic and hard links and devices are refused (pack never writes one); so are names twice."""
    cases = {
        "a symbolic link": [(info(f"{SEED}/lightning_logs/evil", tarfile.SYMTYPE, "/etc/passwd"), None)],
        "a hard link": [(info(f"{SEED}/evil", tarfile.LNKTYPE, f"{SEED}/DONE"), None)],
        "not a regular file (a device": [(info(f"{SEED}/dev", tarfile.CHRTYPE), None)],
        "is there twice": [(tarfile.TarInfo(f"{SEED}/DONE"), b"")],
    }
    before = files(tmp_path)
    for i, (said, extra) in enumerate(cases.items()):
        build(ws / f"{i}.tar.gz", manifest(), None, extra)
        before[f"ws/{i}.tar.gz"] = (ws / f"{i}.tar.gz").read_bytes()
        code, _, err = merge_cli(f"{i}.tar.gz", capsys=capsys)
        assert code == 2 and said in err and f"{i}.tar.gz is refused" in err and err.count("\n") == 1, err
    assert files(tmp_path) == before


def test_a_decompression_bomb_is_refused_before_it_is_unpacked(ws: Path, tmp_path: Path, capsys, monkeypatch):
    """A small gzip expanding past the caps: one member over the per-member cap (17 MiB of zeros in a
    ~20 KiB archive, the real 16 MiB limit), members over the total cap, data past the tar's end."""
    bomb = tarfile.TarInfo(f"{SEED}/events.out.tfevents.1")
    bomb.size = 17 * 2**20
    build(ws / "bomb.tar.gz", manifest(), seed_files(), [(bomb, None)])
    with tarfile.open(ws / "bomb.tar.gz", "w:gz", compresslevel=1) as tar:  # streamed, never in memory
        for name, data in [(packing.MANIFEST, json.dumps(manifest()).encode()), *seed_files().items()]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        tar.addfile(bomb, io.BufferedReader(Zeros(bomb.size)))
    assert (ws / "bomb.tar.gz").stat().st_size < 100_000
    # a valid tar, then zeros inside the gzip stream after its end
    tail = io.BytesIO()
    with tarfile.open(fileobj=tail, mode="w") as tar:
        data = json.dumps(manifest(runs=[])).encode()
        member = tarfile.TarInfo(packing.MANIFEST)
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    (ws / "tail.tar.gz").write_bytes(gzip.compress(tail.getvalue() + bytes(4 * 2**20), compresslevel=1))
    before = files(tmp_path)
    code, _, err = merge_cli("bomb.tar.gz", capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert (
        f"member {SEED}/events.out.tfevents.1 unpacks to 17.0 MiB, over the 16.0 MiB limit on one member"
        in err
    )
    code, _, err = merge_cli("tail.tar.gz", capsys=capsys)
    assert code == 2 and "tail.tar.gz is refused" in err and "expands past its tar's end" in err
    monkeypatch.setattr(unpack, "MAX_ARCHIVE_MIB", 0.25)  # total cap: 4 x 0.25 MiB
    logs = {f"{SEED}/log{i}.txt": bytes(200_000) for i in range(6)}
    build(ws / "many.tar.gz", manifest(), {**seed_files(), **logs})
    before["ws/many.tar.gz"] = (ws / "many.tar.gz").read_bytes()
    code, _, err = merge_cli("many.tar.gz", capsys=capsys)
    assert code == 2 and "it unpacks to more than the 1.0 MiB limit on one archive" in err
    assert files(tmp_path) == before


def test_a_malformed_archive_is_one_sentence_naming_it(ws: Path, tmp_path: Path, capsys) -> None:
    good = build(ws / "good.tar.gz", manifest()).read_bytes()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in seed_files().items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    broken = {
        "text.tar.gz": (
            b"just some text\n",
            "not a readable session archive (not gzip, truncated or corrupt",
        ),
        "empty.tar.gz": (b"", "not a readable session archive"),
        "half.tar.gz": (good[: len(good) // 2], "not a readable session archive"),
        "notar.tar.gz": (gzip.compress(b"not a tar" * 100), "not a readable session archive"),
        "cut.tar.gz": (gzip.compress(raw.getvalue()[:1600]), "truncated or corrupt"),  # whole gzip, cut tar
        "unknown-profile.tar.gz": (
            build(ws / "u.tar.gz", manifest(profile="huge")).read_bytes(),
            "not a known profile",
        ),
    }
    for name, (data, _) in broken.items():
        (ws / name).write_bytes(data)
    before = files(tmp_path)
    for name, (_, said) in broken.items():
        code, out, err = merge_cli(name, capsys=capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, (name, err)
        assert err.startswith(f"iamrec.session: error: {name} ") and said in err, (name, err)
    code, _, err = merge_cli("absent.tar.gz", capsys=capsys)
    assert code == 2 and "no archive absent.tar.gz." in err
    # a malformed archive after a good one: the good one is not unpacked either (all are checked first)
    code, _, err = merge_cli("good.tar.gz", "half.tar.gz", capsys=capsys)
    assert code == 2 and "half.tar.gz" in err
    assert files(tmp_path) == before


def test_a_destination_leading_outside_the_runs_root_is_refused(ws: Path, tmp_path: Path, capsys) -> None:
    """A symbolic link already in the runs root does not carry a member outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    Path(SEED).mkdir(parents=True)
    Path(SEED, "lightning_logs").symlink_to(outside)
    build(ws / "a.tar.gz", manifest())
    before = files(tmp_path)
    code, _, err = merge_cli("a.tar.gz", capsys=capsys)
    assert code == 2 and f"member {SEED}/lightning_logs/version_0/hparams.yaml would be written to" in err
    assert files(tmp_path) == before and not any(outside.iterdir())


def test_merge_keeps_the_first_of_two_different_results_and_says_which(ws: Path, capsys) -> None:
    """Issue 18.2: two finished copies that differ (GPU runs are not bit-reproducible): the one already
    there is kept, the other ignored, both named in the printed lines and the log; exit 0."""
    build(ws / "a.tar.gz", manifest(session_dir=None), seed_files(hr10=0.3))
    build(ws / "b.tar.gz", manifest(session_dir=None), seed_files(hr10=0.9))
    log = ws / "merge.log"
    keys = packing.merge(["a.tar.gz"], "results/runs", rebuild=False)
    assert keys == {("tiny", "table2", "ml100k", "iam", 0)}
    metrics = Path(SEED, "test_metrics.json")
    kept = metrics.read_bytes()
    capsys.readouterr()
    packing.merge(["b.tar.gz", "a.tar.gz"], "results/runs", rebuild=False, log=log)
    out = capsys.readouterr().out
    line = (
        "[merge] tiny/table2/ml100k/iam/seed0 finished twice with different results (GPU runs are not "
        "bit-reproducible across sittings): kept the runs root's (results/runs/tiny/table2/ml100k/iam/seed0), "
        "ignored b.tar.gz's"
    )
    assert line in out and line in log.read_text() and "0 unpacked" in out
    assert "a.tar.gz's" not in out  # the identical copy: kept once, silently
    assert metrics.read_bytes() == kept and json.loads(kept)["HR@10"] == 0.3


def test_archive_equal_to_resume_is_refused_and_the_archive_is_intact(ws: Path, tmp_path: Path, capsys):
    build(ws / "a.tar.gz", manifest())
    os.link(ws / "a.tar.gz", ws / "hard.tar.gz")
    before = files(tmp_path)
    for archive, resume in (
        ("a.tar.gz", "a.tar.gz"),
        ("./a.tar.gz", str(ws / "a.tar.gz")),
        ("hard.tar.gz", "a.tar.gz"),
    ):
        with pytest.raises(SystemExit) as stop:
            session.main(
                [
                    "run",
                    "--profile",
                    "tiny",
                    "--seeds",
                    "0",
                    "--resume",
                    "b.tar.gz",
                    resume,
                    "--archive",
                    archive,
                ]
            )
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1
        assert (
            f"--archive {Path(archive)} is also read by --resume ({resume}): a sitting never overwrites"
            in err
        )
    assert files(tmp_path) == before  # not even the session folder
    # a refused pack leaves the archive it would have replaced as it was
    Path("results/runs/tiny/table2/ml100k/iam/seed0").mkdir(parents=True)
    Path("results/runs/tiny/table2/ml100k/iam/seed0/big.log").write_bytes(os.urandom(300_000))
    pack_manifest = manifest(runs=[], session_dir="")
    old = Path("a.tar.gz").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unpack, "MAX_ARCHIVE_MIB", 0.25)
        with pytest.raises(
            packing.SessionError, match="over the 0.25 MiB limit; the biggest files: results/"
        ):
            packing.pack(Path("a.tar.gz"), pack_manifest)
    assert Path("a.tar.gz").read_bytes() == old and not Path("a.tar.gz.partial").exists()


def test_a_sitting_refuses_a_resume_archive_it_cannot_merge_before_starting(ws: Path, tmp_path: Path, capsys):
    """A `--resume` archive that is not one (or breaks a rule) stops the sitting before its first step:
    otherwise it would retrain, on a lent GPU, the cell-seeds that archive holds."""
    (ws / "notes.tar.gz").write_bytes(b"not an archive")
    before = files(tmp_path)
    with pytest.raises(SystemExit) as stop:
        session.main(["run", "--profile", "tiny", "--seeds", "0", "--resume", "notes.tar.gz"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("iamrec.session: error: notes.tar.gz is not a readable session archive")
    assert files(tmp_path) == before  # no session folder, no step run


def test_pack_leaves_symbolic_links_out(ws: Path, tmp_path: Path) -> None:
    run_dir = Path(SEED)
    run_dir.mkdir(parents=True)
    for name, data in seed_files("").items():
        (run_dir / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name.lstrip("/")).write_bytes(data)
    (tmp_path / "secret").write_text("not for the archive")
    (run_dir / "secret.txt").symlink_to(tmp_path / "secret")
    packed = packing.pack(Path("p.tar.gz"), manifest(runs=[], session_dir=""), "results/runs")
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert f"{SEED}/DONE" in names and f"{SEED}/secret.txt" not in names
    assert packing.merge([packed], "elsewhere", rebuild=False) == {("tiny", "table2", "ml100k", "iam", 0)}


# ---------------------------------------------------------------------------------- 2. one writer


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_second_writer_refuses_while_the_first_lives(ws: Path, tmp_path: Path, capsys) -> None:
    """The lock held by a live process (not this one's ancestor): reproduce, a sitting and a merge on
    that runs root refuse with one sentence naming the root and the pid; nothing is written."""
    other = _sleeper()
    try:
        root = Path("results/runs/tiny/table2")
        root.mkdir(parents=True)
        (root / writer.LOCK_FILE).write_text(f"{other.pid}\n")
        before = files(tmp_path)
        with pytest.raises(SystemExit) as stop:
            rp.main(["table2", "--profile", "tiny", "--seeds", "0", "--methods", "popular"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1
        assert f"{root} is not written now: another process (pid {other.pid}) writes into it" in err
        with pytest.raises(SystemExit) as stop:  # the sitting locks results/runs: the table's lock is inside
            session.main(
                ["run", "--profile", "tiny", "--seeds", "0", "--skip", "assets,data,tests,bench,tables"]
            )
        err = capsys.readouterr().err
        assert (
            stop.value.code == 2 and f"(pid {other.pid}) writes into {root} (lock {root}/.writer.lock)" in err
        )
        build(ws / "a.tar.gz", manifest())
        before["ws/a.tar.gz"] = (ws / "a.tar.gz").read_bytes()
        code, _, err = merge_cli("a.tar.gz", capsys=capsys)
        assert code == 2 and f"pid {other.pid}" in err
        assert files(tmp_path) == before
    finally:
        other.kill()
        other.wait()


def test_a_dead_writers_lock_is_taken_over_and_a_child_shares_its_parents(ws: Path, capsys) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = ws / "runs"
    root.mkdir()
    lock = root / writer.LOCK_FILE
    lock.write_text(f"{dead.pid}\n")
    with writer.runs_lock(root):
        assert lock.read_text().split()[0] == str(os.getpid())
        assert f"notice: took over the writer lock {lock} from pid {dead.pid}, which no longer runs." in (
            capsys.readouterr().err
        )
        child = subprocess.run(  # a stage (or the sitting's reproduce) of this process: not refused
            [sys.executable, "-c", f"from iamrec.tables.writer import runs_lock\nwith runs_lock({str(root)!r}): print('in')"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        )  # fmt: skip
        assert child.returncode == 0 and child.stdout == "in\n", child.stderr
        assert lock.read_text().split()[0] == str(os.getpid())  # still this process's
    assert not lock.exists()  # released
    lock.write_text("garbage")  # unreadable: taken over too
    with writer.runs_lock(root):
        pass
    assert "from an unreadable lock" in capsys.readouterr().err and not lock.exists()


# ------------------------------------------------------------------------------------ 2. no orphans

PARENT = textwrap.dedent(
    """
    import sys, time
    from iamrec.tables.writer import popen
    child = popen([sys.executable, "-c", "import os, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)",
                   sys.argv[1]])
    child.wait()
    """
).replace("import os, time;", "import os, sys, time;")


def test_a_sigkilled_parent_leaves_no_stage_alive(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(pid_file)], env={**os.environ, "PYTHONPATH": str(REPO / "src")}
    )
    try:
        deadline = time.time() + 20
        while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.02)
        child = int(pid_file.read_text())
        assert writer.alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while writer.alive(child) and time.time() < deadline:
            time.sleep(0.02)
        assert not writer.alive(child)  # PR_SET_PDEATHSIG: it went with its parent
    finally:
        parent.kill()
        parent.wait()
        if pid_file.is_file() and pid_file.read_text() and writer.alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_sigterm_stops_the_stage_of_a_run_one_at_a_time(
    processed_dir: Path, ws: Path, tmp_path: Path, monkeypatch
) -> None:
    """Without --jobs the stage is waited for in the main thread: SIGTERM there stops it too (before, it
    kept running), and its start asked to die with the parent."""
    from iamrec.tables import plan as tp
    from iamrec.tables import runner

    Path("data/processed").mkdir(parents=True)
    Path("data/processed/ml100k").symlink_to(processed_dir)
    monkeypatch.setattr(tp, "backbone_available", lambda spec: True)
    sleepers: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(argv, **kw):
        assert "preexec_fn" in kw  # writer.popen: dies with its parent
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw)
        sleepers.append(proc)
        return proc

    monkeypatch.setattr(runner.subprocess, "Popen", popen)

    def interrupt() -> None:
        deadline = time.time() + 30
        while not sleepers and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=interrupt, daemon=True)
    previous = signal.signal(signal.SIGTERM, rp._terminated)
    timer.start()
    try:
        with pytest.raises(SystemExit):
            runner.reproduce(
                TableRun("table2", ["ml100k"], [0], "tiny", ws / "runs", ws / "t2", methods=["iam"])
            )
    finally:
        timer.join()
        signal.signal(signal.SIGTERM, previous)
    assert len(sleepers) == 1 and sleepers[0].poll() is not None
    assert not (ws / "runs" / writer.LOCK_FILE).exists()  # the lock went with the run


# ---------------------------------------------------------------------------------------- 3. numbers

NUMBERS = [
    (["--minutes", "nan"], "--minutes must be a finite number of minutes >= 0, got nan."),
    (["--minutes", "inf"], "--minutes must be a finite number of minutes >= 0, got inf."),
    (["--minutes", "-1"], "--minutes must be a finite number of minutes >= 0, got -1.0."),
    (["--jobs", "0"], "--jobs must be at least 1, got 0."),
    (["--jobs", "-2"], "--jobs must be at least 1, got -2."),
    (["--seeds", "0", "-1"], "--seeds must be whole numbers >= 0, got -1."),
    (
        ["--datasets", "../x"],
        "'../x' is not a dataset name (letters, digits, _ . -); known: ml100k, toys, sports, beauty.",
    ),
]


@pytest.mark.parametrize(("flags", "said"), NUMBERS, ids=[" ".join(f) for f, _ in NUMBERS])
def test_numbers_that_mean_nothing_are_refused_naming_the_flag(flags, said, ws: Path, tmp_path: Path, capsys):
    before = files(tmp_path)
    for main, argv in (
        (rp.main, ["table2", "--profile", "tiny", *flags]),
        (session.main, ["run", "--profile", "tiny", "--skip", "assets,data,tests,bench", *flags]),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.endswith(f"error: {said}\n") and err.count("\n") == 1, err
    assert files(tmp_path) == before
