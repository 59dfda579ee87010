"""`python -m iamrec.session`: one sitting into one archive (`run`), several archives into one report (`merge`).

On a CPU: the GPU steps are skipped ('no CUDA') or left out with --skip; the table step runs the `tiny`
profile (random tiny Llama) on the fixture dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from iamrec import session
from iamrec.run_folder import is_done
from iamrec.tables import archive as packing
from iamrec.tables import plan as rp
from iamrec.tables import sitting, unpack

REPO = Path(__file__).resolve().parents[1]
METRICS = {"HR@5": 0.2, "HR@10": 0.3, "HR@20": 0.4, "NDCG@5": 0.1, "NDCG@10": 0.15, "NDCG@20": 0.2}
NO_GPU = "print('python test')\n"  # a fast `env` step that sees no GPU


@pytest.fixture
def workspace(processed_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """A working folder with the real configs and the fixture dataset as ml100k (what the repository
    root is to a session)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "data" / "processed").mkdir(parents=True)
    (tmp_path / "data" / "processed" / "ml100k").symlink_to(processed_dir)
    return tmp_path


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as info:
        session.main(["run", *argv])
    return info.value.code


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def manifest(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return json.loads(tar.extractfile(packing.MANIFEST).read())


def fake_run(
    method: str,
    seed: int,
    hr10: float = 0.3,
    finished: bool = True,
    table: str = "table2",
    profile: str = "tiny",
) -> Path:
    """A run folder as `reproduce` leaves it: checkpoints, Lightning's logs, test outputs, DONE."""
    run_dir = rp.default_root(profile, table) / "ml100k" / method / f"seed{seed}"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    logs = run_dir / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "hparams.yaml").write_text("lr: 0.001\n")
    (logs / "config.yaml").write_text("seed_everything: 0\n")
    (run_dir / "FIT_DONE").write_text("")
    if finished:
        predictions = pd.DataFrame(
            {"sample_index": [0, 1], "user_id": [0, 1], "target": [1, 2], "rank": [0, -1]}
        )
        for folder in (logs, run_dir):
            (folder / "test_metrics.json").write_text(json.dumps({**METRICS, "HR@10": hr10, "users": 2}))
            predictions.to_parquet(folder / "predictions.parquet")
        (run_dir / "DONE").write_text(json.dumps({"profile": profile, "seconds": 3.0}))
    return run_dir


def test_run_on_a_cpu_packs_one_archive_without_checkpoints(workspace: Path) -> None:
    """The whole command with the tiny profile: real fit/test subprocesses, then the archive."""
    archive = workspace / "out" / "sitting.tar.gz"
    code = run(
        "--profile", "tiny", "--skip", "assets,data,tests,bench", "--seeds", "0",
        "--methods", "popular,iam", "--archive", str(archive),
    )  # fmt: skip
    assert code == 0
    assert archive.stat().st_size < unpack.MAX_ARCHIVE_MIB * 2**20
    names = members(archive)
    assert not [n for n in names if n.endswith(".ckpt") or n.startswith((".assets", "data/"))]
    root = "results/runs/tiny/table2/ml100k"
    for method in ("popular", "iam"):
        assert f"{root}/{method}/seed0/test_metrics.json" in names
        assert (
            f"{root}/{method}/seed0/predictions.parquet" in names and f"{root}/{method}/seed0/DONE" in names
        )
    assert any(n.startswith(f"{root}/iam/seed0/lightning_logs/") and n.endswith("config.yaml") for n in names)
    assert "results/tiny/table2.md" in names and "results/tiny/table2.png" in names
    info = manifest(archive)
    folder = info["session_dir"]
    for step in ("env", "assets", "data", "tests", "bench_train", "table_table2"):
        assert f"{folder}/{step}.log" in names
    assert f"{folder}/env.txt" in names and f"{folder}/summary.txt" in names
    steps = {s["name"]: s["status"] for s in info["steps"]}
    assert steps["table_table2"] == "ok" and steps["tests"] == "skipped: --skip tests"
    assert {(r["method"], r["seed"], r["finished"]) for r in info["runs"]} >= {
        ("iam", 0, True),
        ("popular", 0, True),
    }
    assert info["left"] == []  # the methods asked for are finished
    with tarfile.open(archive) as tar:
        env = tar.extractfile(f"{folder}/env.txt").read().decode()
    assert "torch " in env and "lightning " in env


def test_steps_that_need_a_gpu_are_skipped_and_the_rest_goes_on(workspace: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sitting, "ENV_SCRIPT", NO_GPU)
    fake_run("iam", 0)
    argv = ["--profile", "gpu", "--skip", "assets,data", "--seeds", "0", "--archive", "a.tar.gz"]
    assert run(*argv, "--tests", "--bench") == 0  # asked for, then skipped for want of a GPU
    steps = {s["name"]: s["status"] for s in manifest(Path("a.tar.gz"))["steps"]}
    assert steps["tests"] == steps["bench_train"] == steps["bench_decoding_iam"] == "skipped: no CUDA"
    assert steps["table_table2"].startswith("skipped: no CUDA (profile gpu needs one")
    assert "skipped: no CUDA" in (Path(manifest(Path("a.tar.gz"))["session_dir"]) / "tests.log").read_text()
    with pytest.raises(SystemExit) as info:
        session.main(["run", "--skip", "assets,nope"])
    assert info.value.code == 2 and "unknown step(s) ['nope'] in --skip" in capsys.readouterr().err


def test_an_archive_over_the_limit_is_refused_naming_the_biggest_files(
    workspace: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(sitting, "ENV_SCRIPT", NO_GPU)
    monkeypatch.setattr(unpack, "MAX_ARCHIVE_MIB", 0.25)
    run_dir = fake_run("iam", 0)
    (run_dir / "lightning_logs" / "version_0" / "events.out.tfevents.1").write_bytes(os.urandom(600_000))
    code = run(
        "--profile",
        "tiny",
        "--skip",
        "assets,data,tests,bench,tables",
        "--seeds",
        "0",
        "--archive",
        "a.tar.gz",
    )
    err = capsys.readouterr().err
    assert code == 2 and "over the 0.25 MiB limit; the biggest files: " in err
    assert "events.out.tfevents.1 (0.6 MiB)" in err and err.count("\n") == 1  # one sentence
    assert not Path("a.tar.gz").exists() and not Path("a.tar.gz.partial").exists()


def test_merge_two_sittings_into_one_report(workspace: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sitting, "ENV_SCRIPT", NO_GPU)
    pack = ("--profile", "tiny", "--skip", "assets,data,tests,bench,tables")
    # sitting 1: seed 0 of four rows (hatllm's fit ended without a test); sitting 2: seed 1 of two rows
    for method in ("popular", "sasrec", "causal", "iam"):
        fake_run(method, 0, hr10=0.3)
    fake_run("hatllm", 0, finished=False)
    assert run(*pack, "--seeds", "0", "--archive", "a.tar.gz") == 0
    assert not [n for n in members(Path("a.tar.gz")) if n.endswith(".ckpt")]
    shutil.rmtree("results")
    fake_run("causal", 1, hr10=0.1)
    fake_run("iam", 1, hr10=0.5)
    assert run(*pack, "--seeds", "1", "--archive", "b.tar.gz") == 0
    shutil.rmtree("results")

    session.main(["merge", "a.tar.gz", "b.tar.gz"])
    root = Path("results/runs/tiny/table2/ml100k")
    assert is_done(root / "iam/seed0") and is_done(root / "iam/seed1") and is_done(root / "causal/seed1")
    assert not (root / "hatllm/seed0/DONE").exists()  # unfinished copies are not merged
    assert not list(Path("results/runs").rglob("*.ckpt"))
    report = Path("results/tiny/table2.md").read_text()
    assert "Merged by `python -m iamrec.session merge` from 2 sitting(s): a.tar.gz (" in report
    assert "| iam | 2 | " in report and "| causal | 2 | " in report and "| popular | 1 | " in report
    assert "0.4000 ± 0.1414" in report  # iam's HR@10 over the two sittings' seeds (0.3, 0.5)
    assert "## Not finished in any sitting" in report and "- ml100k/hatllm seed0" in report
    assert Path("results/tiny/table2.csv").is_file() and Path("results/tiny/table2.png").is_file()
    assert (
        "[merge] 6 finished cell-seed(s) in 2 archive(s): 6 unpacked into results/runs"
        in capsys.readouterr().out
    )

    # an identical duplicate is fine (the same archive again); of two different finished results the first
    # seen is kept, and the merge says which (GPU runs are not bit-reproducible across sittings)
    session.main(["merge", "a.tar.gz"])
    assert "4 finished cell-seed(s) in 1 archive(s): 0 unpacked into results/runs, 4 there already" in (
        capsys.readouterr().out
    )
    shutil.rmtree("results/runs/tiny")
    fake_run("iam", 0, hr10=0.9)
    assert run(*pack, "--seeds", "0", "--archive", "c.tar.gz") == 0
    shutil.rmtree("results")
    capsys.readouterr()
    session.main(["merge", "a.tar.gz", "c.tar.gz"])
    out = capsys.readouterr().out
    kept = (
        "[merge] tiny/table2/ml100k/iam/seed0 finished twice with different results (GPU runs are not "
        "bit-reproducible across sittings): kept a.tar.gz's, ignored c.tar.gz's"
    )
    assert kept in out and "4 finished cell-seed(s) in 2 archive(s): 4 unpacked" in out
    assert json.loads(Path(root / "iam/seed0/test_metrics.json").read_text())["HR@10"] == 0.3  # a's


def test_resume_merges_earlier_sittings_first_and_does_not_pack_them_again(
    workspace: Path, monkeypatch
) -> None:
    monkeypatch.setattr(sitting, "ENV_SCRIPT", NO_GPU)
    pack = ("--profile", "tiny", "--skip", "assets,data,tests,bench,tables", "--seeds", "0")
    fake_run("iam", 0)
    assert run(*pack, "--archive", "a.tar.gz") == 0
    shutil.rmtree("results")  # the next sitting is a fresh machine
    fake_run("causal", 0)
    assert run(*pack, "--resume", "a.tar.gz", "--archive", "b.tar.gz") == 0
    assert is_done(Path("results/runs/tiny/table2/ml100k/iam/seed0"))  # restored from a.tar.gz
    info = manifest(Path("b.tar.gz"))
    assert [(r["method"], r["seed"]) for r in info["runs"]] == [("causal", 0)]
    assert {s["name"]: s["status"] for s in info["steps"]}["resume"] == "ok"


def test_gpu_runs_pack_and_merge_where_the_repository_keeps_them(workspace: Path, capsys) -> None:
    """The gpu profile's runs live in the repository (results/gpu/runs/<table>): an archive packs them from
    there and a merge on another machine puts them back there, with the report over them."""
    run_dir = fake_run("iam", 0, profile="gpu")
    assert run_dir.as_posix() == "results/gpu/runs/table2/ml100k/iam/seed0"
    manifest = {"profile": "gpu", "tables": ["table2"], "datasets": ["ml100k"], "seeds": [0]}
    packing.pack(Path("g.tar.gz"), manifest)
    assert f"{run_dir.as_posix()}/test_metrics.json" in members(Path("g.tar.gz"))
    shutil.rmtree("results")
    session.main(["merge", "g.tar.gz"])
    assert is_done(run_dir) and not Path("results/runs/gpu").exists()
    assert "1 finished cell-seed(s) in 1 archive(s): 1 unpacked" in capsys.readouterr().out
    assert "| iam | 1 | " in Path("results/gpu/table2.md").read_text()
