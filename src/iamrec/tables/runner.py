"""Running a table: every cell x seed not finished yet, one after another or side by side, then the report.

Each cell x seed runs in `<root>/<dataset>/<method>/seed<k>/` (the run folder of `iamrec.run_folder`, which
`iamrec.results` reads):

- LLM cells (`causal`, `iam`, `hatllm`, ablation schedules): `iamrec fit`, then `iamrec test --ckpt_path last`
  (subprocesses), `--seed_everything=<k>`, `--trainer.default_root_dir=<seed dir>`;
- `sasrec`: the same two stages through `python -m iamrec.baselines.sasrec` (its own LightningCLI; the test
  stage loads the best-validation checkpoint);
- `popular`: `evaluate_popular` in-process on exactly the LLM cells' test subset (same `data.max_eval_samples`
  and `data.seed`, chosen by `iamrec.data.eval_subset_rows` as for every method).

The newest test outputs (`test_metrics.json`, `predictions.parquet`) are copied up into the seed folder,
then a `DONE` marker (JSON: profile, commands, seconds) is written. A rerun skips seeds with `DONE`; an
interrupted fit resumes from `checkpoints/last.ckpt` (`--ckpt_path last`); a finished fit (`FIT_DONE`) is
not redone. A cell whose settings equal a finished cell of the other table (same resolved config, profile
and seed, sibling root `<root>/../<other table>`) is not trained again: its results are copied and its
`DONE` names the run they came from (`reused_from`). Cells whose processed data or backbone are absent get a
`MISSING` marker and are listed in the report with the command that would provide them.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from iamrec import run_folder
from iamrec.baselines.popular import evaluate_popular
from iamrec.tables.budget import run_budgeted, timing_record
from iamrec.tables.plan import (
    TABLES,
    Cell,
    Profile,
    TableRun,
    command,
    display,
    missing_inputs,
    plan,
    popular_rows,
    resolved_config,
    stage_commands,
)
from iamrec.tables.report import table_report
from iamrec.tables.writer import popen, runs_lock

_RUNNING: dict[subprocess.Popen, str] = {}  # stage processes alive now -> their cell-seed's name
_RUNNING_LOCK = threading.Lock()


class CellFailed(RuntimeError):
    """Some cell-seeds failed; the others ran and the report (`report`) was written."""

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report


_CELL_SEED = threading.local()  # the cell-seed a thread runs (`run_seed`), so its stages can be stopped


def _call(argv: list[str], log: Path | None = None) -> None:
    """Run one stage; its output goes to the console, or appended to `log` (parallel cell-seeds)."""
    with open(log, "ab") if log is not None else contextlib.nullcontext() as out:
        # dies with this process (SIGKILL included) and stays in its process group (Ctrl-C reaches it)
        proc = popen(argv, stdout=out, stderr=subprocess.STDOUT if out is not None else None)
        with _RUNNING_LOCK:
            _RUNNING[proc] = getattr(_CELL_SEED, "name", "")
        try:
            code = proc.wait()
        except BaseException:  # SIGTERM (SystemExit) or Ctrl-C while waiting here: the stage goes too
            _stop([proc], grace=30.0)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(proc, None)
    if code != 0:
        raise subprocess.CalledProcessError(code, list(argv))


def stop_running(grace: float = 30.0, tag: str | None = None) -> None:
    """SIGTERM every stage process still alive (of the cell-seed `tag`, or all; Lightning saves nothing
    half: checkpoints are atomic), then SIGKILL the ones still alive after `grace` seconds."""
    with _RUNNING_LOCK:
        procs = [p for p, t in _RUNNING.items() if tag is None or t == tag]
    _stop(procs, grace)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM, then SIGKILL what is still alive after `grace` seconds."""
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()
    end = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(end - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def run_seed(
    cell: Cell,
    seed: int,
    root: Path,
    profile: Profile,
    log: Path | None = None,
    side_by_side: Callable[[], int] | None = None,
) -> None:
    """Run (or resume) one cell x seed and flatten its outputs into the seed folder, then mark DONE.

    `log`: where the stages' output goes (appended), instead of the console. `side_by_side`: how many LLM
    cell-seeds shared the GPU with it at most (recorded with its rates in the DONE record's ``timing``)."""
    run_dir = cell.run_dir(root, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    _CELL_SEED.name = f"{cell.name} seed{seed}"
    start, done_cmds = time.time(), []
    if cell.kind == "popular":
        data_dir, rows = popular_rows(cell, profile)
        evaluate_popular(data_dir, "test", sample_indices=rows, out_dir=run_dir)
        done_cmds.append(f"evaluate_popular({data_dir!r}, test rows: {len(rows)})")
    else:
        for i, stage in enumerate(("fit", "test")):
            if stage == "fit" and run_folder.is_fit_done(run_dir):
                continue
            # built per stage: the test stage names the checkpoint the fit stage just wrote (SASRec's best)
            argv = stage_commands(cell, seed, root, profile)[i][1]
            print(f"[reproduce] {cell.name} seed{seed} {stage}: {display(argv)}", flush=True)
            _call(argv, log)
            if stage == "fit":
                run_folder.mark_fit_done(run_dir)
            done_cmds.append(display(argv))
        run_folder.copy_test_outputs(run_folder.latest_test_outputs(run_dir), run_dir)
    seconds = time.time() - start
    record = {"profile": profile.name, "commands": done_cmds, "seconds": round(seconds, 1)}
    if cell.kind == "llm":
        timing = timing_record(run_dir, seconds, side_by_side() if side_by_side else 1)
        record.update({"timing": timing} if timing else {})
    run_folder.mark_done(run_dir, record)


def twin_run(cell: Cell, seed: int, root: Path, profile: Profile) -> Path | None:
    """A finished run of the same settings in another table (sibling root `root.parent / <table>`), or None."""
    for table, methods in TABLES.items():
        twin = Cell(table, cell.dataset, cell.method)
        if table == cell.table or cell.method not in methods or not twin.config.is_file():
            continue
        run_dir = twin.run_dir(Path(root).parent / table, seed)
        if not run_folder.is_done(run_dir) or run_folder.read_done(run_dir).get("profile") != profile.name:
            continue
        if resolved_config(twin, profile) == resolved_config(cell, profile):
            return run_dir
    return None


def reuse_seed(run_dir: Path, twin: Path) -> None:
    """Copy a finished twin run's outputs into `run_dir` and mark it DONE with where they came from."""
    run_folder.copy_test_outputs(twin, run_dir)
    run_folder.mark_done(run_dir, {**run_folder.read_done(twin), "reused_from": str(twin)})


def check_profile(run_dir: Path, profile: Profile) -> None:
    """A finished run of another profile in `run_dir` is an error (two profiles never share a root)."""
    done = None if run_folder.done_problem(run_dir) else run_folder.read_done(run_dir)
    if done is not None and done.get("profile", profile.name) != profile.name:
        raise ValueError(f"{run_dir} holds a finished run of another profile; use a different --root.")


def expected_seconds(cell: Cell, root: str | Path) -> float | None:
    """Mean `seconds` of the cell's finished seeds under `root` (their `DONE` records), or None."""
    seconds = []
    for dataset, method, _, run_dir in run_folder.finished_runs(root):
        same = (dataset, method) == (cell.dataset, cell.method)
        done = run_folder.read_done(run_dir) if same and run_folder.is_done(run_dir) else None
        if done and isinstance(done.get("seconds"), (int, float)):
            seconds.append(float(done["seconds"]))
    return sum(seconds) / len(seconds) if seconds else None


def _failure(err: BaseException) -> str:
    return display(err.cmd) if isinstance(err, subprocess.CalledProcessError) else str(err)


class TableRunner:
    """Plan, run what is not finished, and write the report of one `TableRun`.

    Budget (`minutes`): no cell-seed is started once it is spent, nor one whose expected time (the mean
    `seconds` of the cell's finished seeds) does not fit what is left. The report lists the cell-seeds left
    and the command that continues them (a rerun skips what is done). A failed cell-seed does not stop the
    others: the report is written, then `CellFailed` names them. With `jobs` > 1 each cell-seed's stage
    output goes to ``<seed dir>/reproduce.log`` instead of the console, and they start in the same
    seed-major order as one at a time."""

    def __init__(self, run: TableRun) -> None:
        self.run = run
        self.deadline = None if run.minutes is None else time.time() + 60 * run.minutes
        self.lines = [
            f"# {run.table}, profile {run.profile} ({run.prof.about}), seeds {list(run.seeds)}, root {run.root}"
        ]
        self.expected: dict[str, str] = {}  # cell -> the command that runs (or provides) it
        self.present: list[Cell] = []  # the cells to run (inputs present, among `methods`)
        self.left: list[str] = []  # "<cell> seed<k> (why)" not started within the budget
        self.failed: list[str] = []
        self.running: dict[Future, tuple[str, Path]] = {}  # jobs > 1: started, not collected (name, log)
        self.pool: ThreadPoolExecutor | None = None
        self.baseline_prior: dict[str, float] = {}  # method -> seconds (results/<profile>/rates.json)

    def say(self, line: str) -> None:
        self.lines.append(line)
        if not self.run.dry_run:
            print(line, flush=True)

    # ------------------------------------------------------------------------------------ the steps

    def check_inputs(self) -> None:
        """Mark the cells whose inputs are absent MISSING (with the command that provides them)."""
        run = self.run
        for cell in plan(run.table, run.datasets):
            missing = missing_inputs(cell, run.prof)
            marker = run_folder.missing_marker(run.root, cell.dataset, cell.method)
            if missing is not None:
                reason, provide = missing
                self.expected[cell.name] = provide
                self.lines.append(f"{cell.name}: MISSING: {reason} -> {provide}")
                if not run.dry_run:
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    run_folder.write_atomic(marker, reason + "\n")
                continue
            self.expected[cell.name] = command(
                run.table, run.profile, [cell.dataset], run.seeds, root=run.root, out=run.out
            )
            if marker.is_file() and not run.dry_run:
                marker.unlink()  # the inputs exist now
            if run.methods is None or cell.method in run.methods:
                self.present.append(cell)

    def settled(self, cell: Cell, seed: int) -> bool:
        """True when the cell-seed needs no run: finished already, or reused from a finished twin."""
        run_dir = cell.run_dir(self.run.root, seed)
        problem = run_folder.done_problem(run_dir)
        if problem is not None:  # e.g. truncated by a crash mid-write before writes were atomic
            self.say(f"{cell.name} seed{seed}: {problem} Treating it as not done: it runs again.")
            if not self.run.dry_run:
                run_folder.clear_done(run_dir)
        check_profile(run_dir, self.run.prof)
        if run_folder.is_done(run_dir):
            self.say(f"{cell.name} seed{seed}: done, skipped")
            return True
        twin = twin_run(cell, seed, self.run.root, self.run.prof)
        if twin is not None:
            self.say(f"{cell.name} seed{seed}: same settings as {twin} (finished): results reused")
            if not self.run.dry_run:
                reuse_seed(run_dir, twin)
            return True
        return False

    def expected_seconds(self, cell: Cell) -> float | None:
        return expected_seconds(cell, self.run.root)

    def submit(self, cell: Cell, seed: int, side_by_side: Callable[[], int]) -> Future:
        """Start a cell-seed in the pool (budgeted runs); its output goes to ``<seed dir>/reproduce.log``."""
        log = cell.run_dir(self.run.root, seed) / "reproduce.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        block = self.plan_block(cell, seed) + [f"    (output: {log})"]
        self.lines.extend(block)
        print("\n".join(block), flush=True)
        return self.pool.submit(run_seed, cell, seed, self.run.root, self.run.prof, log, side_by_side)

    def stop(self, name: str) -> None:
        """Stop the stages of one running cell-seed (a probe that cannot finish)."""
        stop_running(grace=30.0, tag=name)

    def collected(self, name: str, future: Future, quiet: bool = False) -> None:
        """Record how a cell-seed of the pool ended (`quiet`: stopped on purpose, said already)."""
        err = future.exception()
        log = f"{name.split(' seed')[0]}"
        if err is None:
            self.say(f"{name}: finished")
        elif quiet:
            return
        elif isinstance(err, (subprocess.CalledProcessError, FileNotFoundError)):
            self.failed.append(f"{name} ({_failure(err)})")
            self.say(
                f"{name}: FAILED ({_failure(err)}; its output: {log}/reproduce.log); going on with the others"
            )
        else:
            raise err

    def plan_block(self, cell: Cell, seed: int) -> list[str]:
        """The lines that say what a cell-seed will run."""
        run_dir = cell.run_dir(self.run.root, seed)
        state = "resume" if run_folder.last_checkpoint(run_dir).is_file() else "run"
        block = [f"{cell.name} seed{seed}: {state}"]
        if cell.kind == "popular":
            block.append(
                "    evaluate_popular on the LLM cells' test rows (data.max_eval_samples, data.seed)"
            )
        for stage, argv in stage_commands(cell, seed, self.run.root, self.run.prof):
            skip = " (finished, skipped)" if stage == "fit" and run_folder.is_fit_done(run_dir) else ""
            block.append(f"    {stage}{skip}: {display(argv)}")
        return block

    def start(self, cell: Cell, seed: int, block: list[str]) -> None:
        """Run the cell-seed here (one at a time) or hand it to the pool (side by side)."""
        run = self.run
        k = list(run.seeds).index(seed) * len(self.present) + self.present.index(cell) + 1  # progress
        block[0] = f"[{k}/{len(run.seeds) * len(self.present)}] " + block[0]
        name = f"{cell.name} seed{seed}"
        if self.pool is not None:
            log = cell.run_dir(run.root, seed) / "reproduce.log"
            block.append(f"    (running beside {len(self.running)} other(s); output: {log})")
            print("\n".join(block), flush=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            self.running[self.pool.submit(run_seed, cell, seed, run.root, run.prof, log)] = (name, log)
            self.collect(block=False)
            return
        print("\n".join(block), flush=True)
        try:
            run_seed(cell, seed, run.root, run.prof)
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            self.failed.append(f"{name} ({_failure(err)})")
            self.say(f"{name}: FAILED ({_failure(err)}); going on with the others")

    def collect(self, block: bool) -> None:
        """Wait for a free slot (block) or take what has finished; record failures."""
        if not self.running:
            return
        finished, _ = wait(list(self.running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in finished:
            name, log = self.running.pop(future)
            err = future.exception()
            if err is None:
                self.say(f"{name}: finished")
            elif isinstance(err, (subprocess.CalledProcessError, FileNotFoundError)):
                self.failed.append(f"{name} ({_failure(err)})")
                self.say(f"{name}: FAILED ({_failure(err)}; its output: {log}); going on with the others")
            else:
                raise err

    def run_all(self) -> None:
        """Seed-major: every cell's first seed before any second seed, so a table stopped part-way already
        has one complete row per method (and the paired test its first comparison)."""
        for seed in self.run.seeds:
            for cell in self.present:
                if self.settled(cell, seed):
                    continue
                while self.pool is not None and len(self.running) >= (self.run.jobs or 1):
                    self.collect(block=True)  # a free slot first
                block = self.plan_block(cell, seed)
                self.lines.extend(block)
                if not self.run.dry_run:
                    self.start(cell, seed, block)
        while self.running:
            self.collect(block=True)

    def interrupted(self) -> None:
        """Stop what runs, then still report what is finished (Ctrl-C, SIGTERM from a time limit)."""
        if self.pool is not None:  # the stages still running, then the threads waiting for them
            stop_running()
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.run.dry_run:
            return
        with contextlib.suppress(Exception):
            named = {item.split(" (")[0] for item in self.left + self.failed}
            self.left += [
                f"{cell.name} seed{seed} (stopped before it finished: interrupted or out of time)"
                for seed in self.run.seeds
                for cell in self.present
                if f"{cell.name} seed{seed}" not in named
                and not run_folder.is_done(cell.run_dir(self.run.root, seed))
            ]
            table_report(self.run, self.expected, self.left, self.failed)

    def __call__(self) -> str:
        """Returns the plan (dry run) or the report's markdown; `CellFailed` when some cell-seeds failed.
        A run (not a dry one) holds the runs root's writer lock (`iamrec.tables.writer`)."""
        if self.run.dry_run:
            return self.table()
        with runs_lock(self.run.root):
            return self.table()

    def table(self) -> str:
        self.check_inputs()
        budgeted = self.run.minutes is not None
        if (self.run.jobs or 1) > 1 and not self.run.dry_run and not budgeted:
            self.pool = ThreadPoolExecutor(max_workers=self.run.jobs)
        try:
            run_budgeted(self) if budgeted else self.run_all()
        except BaseException:
            self.interrupted()
            raise
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.run.dry_run:
            return "\n".join(self.lines)
        text = table_report(self.run, self.expected, self.left, self.failed)
        if self.failed:
            raise CellFailed(
                f"{len(self.failed)} cell-seed(s) failed: {'; '.join(self.failed)}; rerun to resume.", text
            )
        return text


def reproduce(run: TableRun) -> str:
    """Run a table (`TableRunner`); returns the plan (dry run) or the report's markdown."""
    return TableRunner(run)()
