"""Run whole tables: every cell x seed, resumable, then one report (`make reproduce-table2|reproduce-ablation`).

    python -m iamrec.reproduce table2|ablation --profile cpu|gpu|tiny|full --datasets ml100k,toys --seeds 0 1 2
        [--methods iam,causal] [--minutes M] [--dry-run] [--update-headers]
        [--root results/runs/<profile>/<table>] [--out results/<profile>/<table>]

A **cell** is one (dataset, method) of a table; its config is `configs/<table>/<dataset>/<method>.yaml`, a
small file layered over the dataset's base config `configs/<dataset>.yaml` (LLM cells; LightningCLI merges
later `--config` files over earlier ones). A **profile** is a set of YAML overlays under `configs/profiles/`
layered last over every cell, one per runner (`<profile>.yaml` over the LLM cells, `<profile>-sasrec.yaml`
over SASRec's): `cpu` shrinks the runs so they finish on a 2-core CPU (the plumbing check, not the
paper's scale); `gpu` is the real table on one GPU (full fine-tuning, one epoch, the whole test split);
`tiny` runs a whole table on any CPU in a minute or two with a random tiny Llama (tests, the session's
dry run); `full` has no overlay (the configs are the paper-scale GPU setting). A new profile is one
overlay file per runner plus one entry of `PROFILES`. The report goes to `results/<profile>/<table>.md`,
`.csv`, `.png` (`cpu`: `results/<table>.*`, as committed), the runs to `results/runs/<profile>/<table>`.

`--minutes M` is a time budget: no cell-seed is started once M minutes have passed, nor one whose expected
time (the mean of its cell's finished seeds, from their `DONE` records) does not fit what is left; the
report lists the cell-seeds left and the command that continues (a rerun skips what is finished). A
failed cell-seed does not stop the others (exit status 1 after the report); SIGTERM (a time limit
around the command) stops the running stage and still writes the report.

Each cell x seed runs in `<root>/<dataset>/<method>/seed<k>/` (the run folder of `iamrec.run_folder`, which
`iamrec.results` reads):

- LLM cells (`causal`, `iam`, `hatllm`, ablation schedules): `iamrec fit`, then `iamrec test --ckpt_path last`
  (subprocesses), `--seed_everything=<k>`, `--trainer.default_root_dir=<seed dir>`;
- `sasrec`: the same two stages through `python -m iamrec.baselines.sasrec` (its own LightningCLI; the test
  stage loads the best-validation checkpoint);
- `popular`: `evaluate_popular` in-process on exactly the LLM cells' test subset (same `data.max_eval_samples`
  and `data.seed`, chosen by `iamrec.data.eval_subset_rows` as for every method).

The newest test outputs (`test_metrics.json`, `predictions.parquet`) are copied up into the seed folder,
then a `DONE` marker (JSON: profile, commands, seconds) is written. A rerun skips seeds with `DONE`; an interrupted fit
resumes from `checkpoints/last.ckpt` (`--ckpt_path last`); a finished fit (`FIT_DONE`) is not redone. Markers are
written atomically (`iamrec.run_folder`); a corrupt `DONE` (e.g. truncated by an older release) is named, removed,
and its cell-seed runs again.
A cell whose settings equal a finished cell of the other table (`causal`, `iam` and `hatllm` are in both
Table 2 and the ablation: same resolved config, profile and seed, sibling root `<root>/../<other table>`)
is not trained again: its results are copied and its `DONE` names the run they came from (`reused_from`).
Cells whose processed data or backbone are absent are not errors: they get a `MISSING` marker and are
listed in the report with the command that would provide them.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iamrec import run_folder
from iamrec.attention.schedule import PRESETS

TABLES: dict[str, tuple[str, ...]] = {
    "table2": ("popular", "sasrec", "causal", "hatllm", "iam"),
    "ablation": PRESETS,  # every layer schedule preset
}
DATASETS: tuple[str, ...] = ("ml100k", "toys", "sports", "beauty")
CONFIG_ROOT = Path("configs")
PROFILE_ROOT = CONFIG_ROOT / "profiles"
RUNS_ROOT = Path("results/runs")
IAMREC = (sys.executable, "-m", "iamrec.cli")
SASREC = (sys.executable, "-m", "iamrec.baselines.sasrec")


@dataclass(frozen=True)
class Profile:
    """YAML overlays layered last (`--config`) over every cell of a run: `llm` over the LLM cells (it
    also sets the test subset most-popular scores), `sasrec` over the SASRec cells."""

    name: str
    llm: tuple[Path, ...]
    sasrec: tuple[Path, ...]
    about: str


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        "cpu",
        llm=(PROFILE_ROOT / "cpu.yaml",),
        sasrec=(PROFILE_ROOT / "cpu-sasrec.yaml",),
        about="2-core CPU: 64 steps x batch 8 (512 train samples), 80 test samples, SmolLM2-135M",
    ),
    "gpu": Profile(
        "gpu",
        llm=(PROFILE_ROOT / "gpu.yaml",),
        sasrec=(PROFILE_ROOT / "gpu-sasrec.yaml",),
        about="one GPU: full fine-tuning, 1 epoch, whole test split, SmolLM2-135M",
    ),
    "tiny": Profile(
        "tiny",
        llm=(PROFILE_ROOT / "tiny.yaml",),
        sasrec=(PROFILE_ROOT / "tiny-sasrec.yaml",),
        about="any CPU in a minute: random tiny Llama, 4 steps, 6 test samples; the plumbing, not a result",
    ),
    "full": Profile("full", llm=(), sasrec=(), about="paper scale on GPUs: the configs as written"),
}

# How to provide a dataset that is not prepared yet.
DATA_COMMANDS = {"ml100k": "make data-ml100k"}
AMAZON_COMMAND = "python -m data_prep.amazon --reviews <reviews file> --meta <meta file> --output {data_dir}"


@dataclass(frozen=True)
class Cell:
    """One table cell: which configs to layer and which runner executes it."""

    table: str
    dataset: str
    method: str

    @property
    def kind(self) -> str:
        return self.method if self.method in ("popular", "sasrec") else "llm"

    @property
    def config(self) -> Path:
        return CONFIG_ROOT / self.table / self.dataset / f"{self.method}.yaml"

    @property
    def configs(self) -> tuple[Path, ...]:
        """The cell's own `--config` files in order: the dataset base then the cell (SASRec's stands alone)."""
        if self.kind == "sasrec":
            return (self.config,)
        return (CONFIG_ROOT / f"{self.dataset}.yaml", self.config)

    def overlays(self, profile: Profile) -> tuple[Path, ...]:
        """The profile's overlays for this cell's runner."""
        return profile.sasrec if self.kind == "sasrec" else profile.llm

    def layers(self, profile: Profile) -> tuple[Path, ...]:
        """Every `--config` file of the cell under `profile`, in order: its configs, then the overlays."""
        return self.configs + self.overlays(profile)

    def run_dir(self, root: Path, seed: int) -> Path:
        return run_folder.seed_dir(root, self.dataset, self.method, seed)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.method}"


def plan(table: str, datasets: Sequence[str]) -> list[Cell]:
    """Every cell of `table` for `datasets`, in table order; an error naming a missing config file."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of {sorted(TABLES)}.")
    cells = [Cell(table, d, m) for d in datasets for m in TABLES[table]]
    absent = [str(c.config) for c in cells if not c.config.is_file()]
    if absent:
        raise FileNotFoundError(f"no config for {absent[0]} (known datasets: {', '.join(DATASETS)}).")
    return cells


# ------------------------------------------------------------------------------------ resolve configs


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def resolved_config(cell: Cell, profile: Profile) -> dict[str, Any]:
    """The cell's config files and the profile's overlays merged in order (what the CLI sees, minus its
    defaults); tested against `--print_config`."""
    config: dict[str, Any] = {}
    for path in cell.layers(profile):
        config = _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def missing_inputs(cell: Cell, profile: Profile) -> tuple[str, str] | None:
    """(reason, command that provides it) when the cell's data or backbone is absent, else None."""
    config = resolved_config(cell, profile)
    data_dir = config.get("data", {}).get("data_dir", f"data/processed/{cell.dataset}")
    reasons, commands = [], []
    if not (Path(data_dir) / "samples.parquet").is_file():
        reasons.append(f"no processed data ({data_dir}/samples.parquet)")
        commands.append(DATA_COMMANDS.get(cell.dataset, AMAZON_COMMAND.format(data_dir=data_dir)))
    if cell.kind == "llm":
        backbone = str(config.get("model", {}).get("backbone", "tiny"))
        if not backbone_available(backbone):
            reasons.append(f"backbone {backbone} not available (no local folder, hub unreachable)")
            commands.append(
                "make assets"
                if backbone.startswith(".assets/")
                else f"set model.backbone to a local copy of {backbone}"
            )
    return ("; ".join(reasons), " && ".join(commands)) if reasons else None


def backbone_available(spec: str) -> bool:
    """A local folder, `tiny`, a hub id already in the HF cache, or a hub that answers."""
    from iamrec.model.loading import hub_reachable, looks_like_hub_id

    if spec == "tiny" or Path(spec).is_dir():
        return True
    if not looks_like_hub_id(spec):
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec, "config.json"), str) or hub_reachable()


# ------------------------------------------------------------------------------------------ commands


def stage_commands(cell: Cell, seed: int, root: Path, profile: Profile) -> list[tuple[str, list[str]]]:
    """[(stage, argv)] for one cell x seed (empty for `popular`, which runs in-process)."""
    if cell.kind == "popular":
        return []
    run_dir = cell.run_dir(root, seed)
    entry = SASREC if cell.kind == "sasrec" else IAMREC
    common = [f"--config={c}" for c in cell.layers(profile)]
    common += [f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}"]
    fit = [*entry, "fit", *common]
    if run_folder.last_checkpoint(run_dir).is_file():
        fit.append("--ckpt_path=last")  # resume an interrupted fit
    best = run_folder.best_checkpoints(run_dir) if cell.kind == "sasrec" else []
    test = [*entry, "test", *common, f"--ckpt_path={best[-1] if best else 'last'}"]
    return [("fit", fit), ("test", test)]  # the order run_seed relies on


def popular_rows(cell: Cell, profile: Profile) -> tuple[str, Any]:
    """(data_dir, test rows of samples.parquet): the LLM cells' test subset (`eval_subset_rows`)."""
    from iamrec.data.dataset import eval_subset_rows

    data = resolved_config(cell, profile).get("data", {})
    data_dir, seed = data["data_dir"], int(data.get("seed", 0))
    return data_dir, eval_subset_rows(data_dir, "test", data.get("max_eval_samples"), seed)


def display(argv: Sequence[str]) -> str:
    """The command as a person would type it (`iamrec ...` instead of `python -m iamrec.cli`)."""
    text = shlex.join(argv)
    return text.replace(shlex.join(IAMREC), "iamrec").replace(
        shlex.join(SASREC), "python -m iamrec.baselines.sasrec"
    )


# -------------------------------------------------------------------------------------------- running


_RUNNING: set[subprocess.Popen] = set()  # stage processes alive now (killed on an interruption)
_RUNNING_LOCK = threading.Lock()


def _call(argv: Sequence[str], log: Path | None = None) -> None:
    """Run one stage; its output goes to the console, or appended to `log` (parallel cell-seeds)."""
    with open(log, "ab") if log is not None else contextlib.nullcontext() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out is not None else None)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            code = proc.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    if code != 0:
        raise subprocess.CalledProcessError(code, list(argv))


def _stop_running(grace: float = 30.0) -> None:
    """SIGTERM every stage process still alive (Lightning saves nothing half: checkpoints are atomic),
    then SIGKILL the ones still alive after `grace` seconds."""
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()
    end = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(end - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()


def run_seed(cell: Cell, seed: int, root: Path, profile: Profile, log: Path | None = None) -> None:
    """Run (or resume) one cell x seed and flatten its outputs into the seed folder, then mark DONE.

    `log`: where the stages' output goes (appended), instead of the console."""
    run_dir = cell.run_dir(root, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    start, done_cmds = time.time(), []
    if cell.kind == "popular":
        from iamrec.baselines.popular import evaluate_popular

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
    record = {"profile": profile.name, "commands": done_cmds, "seconds": round(time.time() - start, 1)}
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


def _check_profile(run_dir: Path, profile: Profile) -> None:
    done = None if run_folder.done_problem(run_dir) else run_folder.read_done(run_dir)
    if done is not None and done.get("profile", profile.name) != profile.name:
        raise ValueError(f"{run_dir} holds a finished run of another profile; use a different --root.")


def default_root(profile: str, table: str) -> Path:
    """``results/runs/<profile>/<table>``: where `reproduce` keeps a table's run folders."""
    return RUNS_ROOT / profile / table


def default_out(profile: str, table: str) -> Path:
    """The report prefix (``.md``, ``.csv``, ``.png``): ``results/<profile>/<table>``; the committed `cpu`
    reports stay at ``results/<table>``."""
    return Path("results") / table if profile == "cpu" else Path("results") / profile / table


def command(
    table: str,
    profile: str,
    datasets: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[str] | None = None,
    root: str | Path | None = None,
    out: str | Path | None = None,
    minutes: float | None = None,
) -> str:
    """The `python -m iamrec.reproduce` line for these settings (`--root`/`--out` only when not the default)."""
    parts = [f"python -m iamrec.reproduce {table} --profile {profile} --datasets {','.join(datasets)}"]
    parts.append(f"--seeds {' '.join(map(str, seeds))}")
    if methods:
        parts.append(f"--methods {','.join(methods)}")
    if root is not None and Path(root) != default_root(profile, table):
        parts.append(f"--root {root}")
    if out is not None and Path(out) != default_out(profile, table):
        parts.append(f"--out {out}")
    if minutes is not None:
        parts.append(f"--minutes {minutes:g}")
    return " ".join(parts)


def expected_seconds(cell: Cell, root: str | Path) -> float | None:
    """Mean `seconds` of the cell's finished seeds under `root` (their `DONE` records), or None."""
    seconds = []
    for dataset, method, _, run_dir in run_folder.finished_runs(root):
        same = (dataset, method) == (cell.dataset, cell.method)
        done = run_folder.read_done(run_dir) if same and run_folder.is_done(run_dir) else None
        if done and isinstance(done.get("seconds"), (int, float)):
            seconds.append(float(done["seconds"]))
    return sum(seconds) / len(seconds) if seconds else None


class CellFailed(RuntimeError):
    """Some cell-seeds failed; the others ran and the report (`report`) was written."""

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report


def write_report(root: str | Path, out: str | Path, expected: dict[str, str], header: str) -> str:
    """Build the report of every finished run under `root` (`iamrec.results.build_report`) and write
    ``<out>.md`` (`header` first), ``<out>.csv``, ``<out>.png``; returns the markdown."""
    from iamrec.results import build_report

    Path(root).mkdir(parents=True, exist_ok=True)
    text = header + build_report(root, out, expected)
    Path(f"{out}.md").write_text(text)
    return text


def reproduce(
    table: str,
    datasets: Sequence[str],
    seeds: Sequence[int],
    profile: str = "cpu",
    root: str | Path | None = None,
    out: str | Path | None = None,
    dry_run: bool = False,
    methods: Sequence[str] | None = None,
    minutes: float | None = None,
    jobs: int = 1,
) -> str:
    """Plan, run what is not finished, and write the report; returns the plan (dry run) or the markdown.

    `methods` restricts what is *run* to those rows (default: all); the report covers every finished run
    under `root`. `minutes`: a time budget; no cell-seed is started once it is spent, nor one whose
    expected time (the mean `seconds` of the cell's finished seeds) does not fit what is left. The
    report lists the cell-seeds left and the command that continues them (a rerun skips what is done).
    A failed cell-seed does not stop the others: the report is written, then `CellFailed` names them.
    `jobs`: cell-seeds run at once (sharing the machine's GPU); with more than one, each cell-seed's
    stage output goes to ``<seed dir>/reproduce.log`` instead of the console, and they start in the same
    seed-major order as one at a time.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}.")
    start = time.time()
    deadline = None if minutes is None else start + 60 * minutes
    prof = PROFILES[profile]
    unknown = sorted(set(methods or ()) - set(TABLES[table])) if table in TABLES else []
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for {table}; choose from {', '.join(TABLES[table])}.")
    root = Path(root or default_root(profile, table))
    out = Path(out or default_out(profile, table))
    lines = [f"# {table}, profile {profile} ({prof.about}), seeds {list(seeds)}, root {root}"]
    expected: dict[str, str] = {}
    present: list[Cell] = []
    for cell in plan(table, datasets):
        missing = missing_inputs(cell, prof)
        marker = run_folder.missing_marker(root, cell.dataset, cell.method)
        if missing is not None:
            reason, provide = missing
            expected[cell.name] = provide
            lines.append(f"{cell.name}: MISSING: {reason} -> {provide}")
            if not dry_run:
                marker.parent.mkdir(parents=True, exist_ok=True)
                run_folder.write_atomic(marker, reason + "\n")
            continue
        expected[cell.name] = command(table, profile, [cell.dataset], seeds, root=root, out=out)
        if marker.is_file() and not dry_run:
            marker.unlink()  # the inputs exist now
        if methods is None or cell.method in methods:
            present.append(cell)

    left: list[str] = []  # "<cell> seed<k> (why)" not started within the budget
    failed: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if not dry_run:
            print(line, flush=True)

    running: dict[
        Future, tuple[str, Path]
    ] = {}  # jobs > 1: cell-seeds started, not yet collected (name, log)

    def collect(block: bool) -> None:
        """Wait for a free slot (block) or take what has finished; record failures."""
        if not running:
            return
        finished, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in finished:
            name, log = running.pop(future)
            err = future.exception()
            if err is None:
                say(f"{name}: finished")
            elif isinstance(err, (subprocess.CalledProcessError, FileNotFoundError)):
                what = display(err.cmd) if isinstance(err, subprocess.CalledProcessError) else str(err)
                failed.append(f"{name} ({what})")
                say(f"{name}: FAILED ({what}; its output: {log}); going on with the others")
            else:
                raise err

    pool = ThreadPoolExecutor(max_workers=jobs) if jobs > 1 and not dry_run else None
    try:
        # Seed-major: every cell's first seed before any second seed, so a table stopped part-way already
        # has one complete row per method (and the paired test its first comparison).
        for seed in seeds:
            for cell in present:
                run_dir = cell.run_dir(root, seed)
                problem = run_folder.done_problem(run_dir)
                if problem is not None:  # e.g. truncated by a crash mid-write before writes were atomic
                    say(f"{cell.name} seed{seed}: {problem} Treating it as not done: it runs again.")
                    if not dry_run:
                        run_folder.clear_done(run_dir)
                _check_profile(run_dir, prof)
                if run_folder.is_done(run_dir):
                    say(f"{cell.name} seed{seed}: done, skipped")
                    continue
                twin = twin_run(cell, seed, root, prof)
                if twin is not None:
                    say(f"{cell.name} seed{seed}: same settings as {twin} (finished): results reused")
                    if not dry_run:
                        reuse_seed(run_dir, twin)
                    continue
                while pool is not None and len(running) >= jobs:
                    collect(block=True)  # a slot first, then the budget is checked at the real start time
                why = None if dry_run or deadline is None else _over_budget(cell, root, deadline)
                if why is not None:
                    left.append(f"{cell.name} seed{seed} ({why})")
                    say(f"{cell.name} seed{seed}: left for another sitting ({why})")
                    continue
                state = "resume" if run_folder.last_checkpoint(run_dir).is_file() else "run"
                block = [f"{cell.name} seed{seed}: {state}"]
                if cell.kind == "popular":
                    block.append(
                        "    evaluate_popular on the LLM cells' test rows (data.max_eval_samples, data.seed)"
                    )
                for stage, argv in stage_commands(cell, seed, root, prof):
                    skip = (
                        " (finished, skipped)" if stage == "fit" and run_folder.is_fit_done(run_dir) else ""
                    )
                    block.append(f"    {stage}{skip}: {display(argv)}")
                lines.extend(block)
                if dry_run:
                    continue
                k = list(seeds).index(seed) * len(present) + present.index(cell) + 1  # progress: [k/N]
                block[0] = f"[{k}/{len(seeds) * len(present)}] " + block[0]
                if pool is not None:
                    log = run_dir / "reproduce.log"
                    block.append(f"    (running beside {len(running)} other(s); output: {log})")
                    print("\n".join(block), flush=True)
                    run_dir.mkdir(parents=True, exist_ok=True)
                    running[pool.submit(run_seed, cell, seed, root, prof, log)] = (
                        f"{cell.name} seed{seed}",
                        log,
                    )
                    collect(block=False)
                    continue
                print("\n".join(block), flush=True)
                try:
                    run_seed(cell, seed, root, prof)
                except (subprocess.CalledProcessError, FileNotFoundError) as err:
                    what = display(err.cmd) if isinstance(err, subprocess.CalledProcessError) else str(err)
                    failed.append(f"{cell.name} seed{seed} ({what})")
                    say(f"{cell.name} seed{seed}: FAILED ({what}); going on with the others")
        while running:
            collect(block=True)
    except BaseException:
        if pool is not None:  # stop the stages still running, then the threads waiting for them
            _stop_running()
            pool.shutdown(wait=True, cancel_futures=True)
        if not dry_run:  # interrupted (Ctrl-C, SIGTERM from a time limit): still report what is finished
            with contextlib.suppress(Exception):
                named = {item.split(" (")[0] for item in left + failed}
                left += [
                    f"{cell.name} seed{seed} (stopped before it finished: interrupted or out of time)"
                    for seed in seeds
                    for cell in present
                    if f"{cell.name} seed{seed}" not in named
                    and not run_folder.is_done(cell.run_dir(root, seed))
                ]
                _report(table, profile, datasets, seeds, methods, root, out, minutes, expected, left, failed)
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    if dry_run:
        return "\n".join(lines)
    text = _report(table, profile, datasets, seeds, methods, root, out, minutes, expected, left, failed)
    if failed:
        raise CellFailed(f"{len(failed)} cell-seed(s) failed: {'; '.join(failed)}; rerun to resume.", text)
    return text


def _over_budget(cell: Cell, root: Path, deadline: float) -> str | None:
    """Why the cell-seed must not start within the budget ending at `deadline`, or None."""
    now = time.time()
    if now >= deadline:
        return "the time budget is spent"
    expected = expected_seconds(cell, root)
    if expected is not None and now + expected > deadline:
        return (
            f"expected {expected / 60:.1f} min from its finished seeds, {(deadline - now) / 60:.1f} min left"
        )
    return None


def _report(
    table: str,
    profile: str,
    datasets: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[str] | None,
    root: Path,
    out: Path,
    minutes: float | None,
    expected: dict[str, str],
    left: Sequence[str],
    failed: Sequence[str],
) -> str:
    """Write the report of what is finished, with the cell-seeds left and failed; returns the markdown."""
    budget = f" within a budget of {minutes:g} min" if minutes is not None else ""
    header = (
        f"# {table}: profile `{profile}` ({PROFILES[profile].about}), seeds {' '.join(map(str, seeds))}\n\n"
        f"Produced by `{command(table, profile, datasets, seeds, methods, root, out)}`{budget} "
        f"from the runs under `{root}`.\n\n"
    )
    text = write_report(root, out, expected, header)
    tail = []
    if left:
        again = command(table, profile, datasets, seeds, methods, root, out, minutes)
        tail += ["## Left for another sitting", ""]
        tail += [f"- {item}" for item in left]
        tail += ["", f"Continue (finished cell-seeds are skipped): `{again}`", ""]
    if failed:
        tail += ["## Failed", ""] + [f"- {item}" for item in failed] + [""]
    if tail:
        text = text.rstrip("\n") + "\n\n" + "\n".join(tail)
        Path(f"{out}.md").write_text(text)
    return text


# ------------------------------------------------------------------------------- config headers


def hardware() -> str:
    """A short description of this machine for config headers: the GPU's name, else the CPU's cores."""
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        name = models[0] if models else name
    return f"{os.cpu_count()}-core CPU ({name})"


def measured_line(row: dict[str, Any], profile: str, seeds: Sequence[int], minutes: float | None) -> str:
    """The ``# Measured:`` header line of a cell config, from its aggregated runs (mean ± std over seeds)."""

    def cell(metric: str) -> str:
        mean, std = row[f"{metric}_mean"], row.get(f"{metric}_std")
        return f"{metric} {mean:.4f}" + (f" ± {std:.4f}" if std is not None and std == std else "")

    took = f", {minutes:.1f} min per seed" if minutes is not None else ""
    return (
        f"# Measured ({time.strftime('%Y-%m-%d')}, profile {profile}, seeds {' '.join(map(str, seeds))}, "
        f"{hardware()}{took}): {', '.join(cell(m) for m in ('HR@10', 'NDCG@10', 'HR@20', 'NDCG@20'))}, "
        f"{int(row['users_mean'])} test samples"
    )


def update_headers(
    table: str, datasets: Sequence[str], seeds: Sequence[int], profile: str, root: str | Path
) -> list[Path]:
    """Rewrite the ``# Measured:`` line of every cell config that has finished runs; returns the files."""
    from iamrec.results import aggregate, collect_runs

    root = Path(root)
    runs = collect_runs(root)
    runs = runs[runs["seed"].isin(list(seeds))]
    if runs.empty:
        return []
    agg = aggregate(runs)
    changed = []
    for cell in plan(table, datasets):
        rows = agg[(agg["dataset"] == cell.dataset) & (agg["method"] == cell.method)]
        if rows.empty:
            continue
        done = [
            run_folder.read_done(d) for d in (cell.run_dir(root, s) for s in seeds) if run_folder.is_done(d)
        ]
        seconds = [d.get("seconds") for d in done if d is not None]
        seconds = [x for x in seconds if x is not None]
        minutes = sum(seconds) / len(seconds) / 60 if seconds else None
        cell_seeds = sorted(
            runs.loc[(runs["dataset"] == cell.dataset) & (runs["method"] == cell.method), "seed"]
        )
        line = measured_line(rows.iloc[0].to_dict(), profile, cell_seeds, minutes)
        text = cell.config.read_text().splitlines()
        at = next((i for i, t in enumerate(text) if t.startswith("# Measured")), None)
        if at is None:
            raise ValueError(f"{cell.config} has no '# Measured' header line to update.")
        end = at + 1
        while end < len(text) and text[end].startswith("#   "):  # the line's continuation lines
            end += 1
        text[at:end] = [line]
        cell.config.write_text("\n".join(text) + "\n")
        changed.append(cell.config)
    return changed


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: the running stage is killed and the report still written


def main(argv: Sequence[str] | None = None) -> None:
    """Run every cell x seed of a table (skipping finished ones) and write the report
    results/<profile>/<table>.md/.csv/.png (profile cpu: results/<table>.*)."""
    p = argparse.ArgumentParser(prog="python -m iamrec.reproduce", description=main.__doc__)
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--datasets", default="ml100k", help=f"comma-separated, from {','.join(DATASETS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default=None, help="runs root (default results/runs/<profile>/<table>)")
    p.add_argument(
        "--out", default=None, help="report prefix (default results/<profile>/<table>; cpu: results/<table>)"
    )
    p.add_argument("--methods", default=None, help="comma-separated rows to run (default: every row)")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget: start no cell-seed once it is spent (nor one whose expected time does not fit); "
        "the report lists what is left and the command that continues",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cell-seeds run at once, sharing the GPU (default 1); each then logs to <seed dir>/reproduce.log",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument(
        "--update-headers",
        action="store_true",
        help="after the report, write each finished cell's '# Measured:' line into its config",
    )
    args = p.parse_args(argv)
    datasets = [d for d in args.datasets.replace(" ", ",").split(",") if d]
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        methods = [m for m in args.methods.replace(" ", ",").split(",") if m] if args.methods else None
        print(
            reproduce(
                args.table,
                datasets,
                args.seeds,
                args.profile,
                args.root,
                args.out,
                args.dry_run,
                methods,
                args.minutes,
                args.jobs,
            )
        )
        if args.update_headers and not args.dry_run:
            root = args.root or default_root(args.profile, args.table)
            for path in update_headers(args.table, datasets, args.seeds, args.profile, root):
                print(f"updated the '# Measured' line of {path}")
    except (ValueError, FileNotFoundError) as err:
        print(f"iamrec.reproduce: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except CellFailed as err:
        print(err.report)
        print(f"iamrec.reproduce: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
