"""A table within a time budget: what each cell-seed has to do, the rates that project it, and the run that
starts only what can finish (`iamrec.tables.schedule`).

Rates, most trusted first: the finished LLM runs of this profile on this device (the ``timing`` of their
``DONE`` records: fit steps and seconds, test samples and seconds, wall time, how many ran side by side),
then ``results/<profile>/rates.json`` (rates measured in earlier sittings, committed, with where each
figure comes from), then a probe: the first LLM cell-seed runs alone and its own ``timing.json`` gives the
rate; it is stopped as soon as its projection shows it cannot finish.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from iamrec import run_folder
from iamrec.data.dataset import eval_subset_rows
from iamrec.tables.plan import TABLES, Cell, TableRun, default_root, resolved_config
from iamrec.tables.schedule import Job, Rates, Scheduler, replay
from iamrec.timing import read_timing

RATES_FILE = "rates.json"
PROBE_MIN_STEPS = 10  # a probe's rate counts once it has run this many steps ...
PROBE_MIN_SECONDS = 5.0  # ... over at least this many seconds


def _train_rows(data_dir: str) -> int:
    split = pq.read_table(Path(data_dir) / "samples.parquet", columns=["split"]).column("split")
    return sum(1 for value in split.to_pylist() if value == "train")


def fit_steps(config: dict[str, Any]) -> int:
    """Optimizer steps of a fit with this resolved config (Lightning's rules for max_steps/max_epochs)."""
    trainer, data = config["trainer"], config["data"]
    rows = _train_rows(data["data_dir"])
    if data.get("max_train_samples") is not None:
        rows = min(rows, int(data["max_train_samples"]))
    batches = math.ceil(rows / int(data["batch_size"]))
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, float) and limit <= 1.0:
        batches = int(batches * limit)
    elif limit is not None:
        batches = min(batches, int(limit))
    per_epoch = math.ceil(batches / int(trainer.get("accumulate_grad_batches") or 1))
    max_steps = trainer.get("max_steps")
    epochs = trainer.get("max_epochs")
    epochs = (1000 if max_steps in (None, -1) else math.inf) if epochs in (None, -1) else int(epochs)
    steps = epochs * per_epoch
    return int(min(steps, max_steps) if max_steps not in (None, -1) else steps)


def cell_job(cell: Cell, seed: int, run: TableRun, cell_seconds: float | None) -> Job:
    """What one cell-seed has to do (a resumed fit counts only its steps left)."""
    name = f"{cell.name} seed{seed}"
    if cell.kind != "llm":
        return Job(name, "baseline", seconds=cell_seconds)
    config = resolved_config(cell, run.prof)
    data = config["data"]
    steps = fit_steps(config)
    run_dir = cell.run_dir(run.root, seed)
    if run_folder.is_fit_done(run_dir):
        steps = 0
    elif run_folder.last_checkpoint(run_dir).is_file():
        steps = max(0, steps - int(read_timing(run_dir).get("fit", {}).get("steps", 0)))
    samples = len(eval_subset_rows(data["data_dir"], "test", data["max_eval_samples"], data["seed"]))
    return Job(name, "llm", fit_steps=steps, test_samples=samples, seconds=cell_seconds)


# ------------------------------------------------------------------------------------------- rates


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def timing_record(run_dir: Path, wall_seconds: float, side_by_side: int) -> dict[str, Any] | None:
    """The ``timing`` of a finished LLM cell-seed's DONE record, from its ``timing.json``."""
    timing = read_timing(run_dir)
    fit, test = timing.get("fit", {}), timing.get("test", {})
    if not test.get("finished"):
        return None
    return {
        "fit_steps": int(fit.get("steps", 0)) - int(fit.get("first_step", 0)),
        "fit_seconds": float(fit.get("seconds", 0.0)),
        "test_samples": int(test.get("samples", 0)),
        "test_seconds": float(test.get("seconds", 0.0)),
        "wall_seconds": round(wall_seconds, 1),
        "side_by_side": side_by_side,
        "device": timing.get("device"),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def recorded_rates(profile: str, device: str | None, roots: list[Path] | None = None) -> Rates | None:
    """Rates from the finished LLM runs of `profile` on `device` (None: any device) under `roots`."""
    steps: dict[int, list[float]] = {}
    users: dict[int, list[float]] = {}
    startup: list[float] = []
    for root in roots or [default_root(profile, t) for t in TABLES]:
        for _, _, _, run_dir in run_folder.finished_runs(root):
            done = run_folder.read_done(run_dir) if run_folder.is_done(run_dir) else None
            timing = (done or {}).get("timing")
            if not timing or (device is not None and timing.get("device") != device):
                continue
            k = int(timing.get("side_by_side", 1))
            if timing["fit_steps"] > 0 and timing["fit_seconds"] > 0:
                steps.setdefault(k, []).append(timing["fit_steps"] / timing["fit_seconds"])
            if timing["test_samples"] > 0 and timing["test_seconds"] > 0:
                users.setdefault(k, []).append(timing["test_samples"] / timing["test_seconds"])
            startup.append(max(0.0, timing["wall_seconds"] - timing["fit_seconds"] - timing["test_seconds"]))
    if not steps:
        return None
    return Rates(
        {k: _mean(v) for k, v in steps.items()}, {k: _mean(v) for k, v in users.items()}, _mean(startup)
    )


def prior_rates(profile: str, device: str | None) -> tuple[Rates | None, dict[str, float], str]:
    """(rates, baseline seconds by method, where from) of ``results/<profile>/rates.json`` for `device`."""
    path = Path("results") / profile / RATES_FILE
    if not path.is_file():
        return None, {}, ""
    data = json.loads(path.read_text())
    if device is not None and data.get("device") != device:
        return None, {}, ""

    def levels(key: str) -> dict[int, float]:
        return {int(k): float(v) for k, v in data.get(key, {}).items()}

    rates = Rates(levels("steps_per_s"), levels("users_per_s"), float(data["startup_s"]))
    return rates, {k: float(v) for k, v in data.get("baseline_seconds", {}).items()}, str(path)


def merged_rates(recorded: Rates | None, prior: Rates | None) -> Rates | None:
    """Recorded levels override the prior's; start-up from the records when there are any."""
    if recorded is None or prior is None:
        return recorded or prior
    return Rates(
        {**prior.steps_per_s, **recorded.steps_per_s},
        {**prior.users_per_s, **recorded.users_per_s},
        recorded.startup_s,
    )


def probe_rates(run_dir: Path, started: float, now: float) -> tuple[Rates, float] | None:
    """(rates at k = 1, fraction done) from a probe's ``timing.json`` once it has run long enough."""
    timing = read_timing(run_dir)
    fit, test = timing.get("fit", {}), timing.get("test", {})
    steps = int(fit.get("steps", 0)) - int(fit.get("first_step", 0))
    seconds = float(fit.get("seconds", 0.0))
    if steps < PROBE_MIN_STEPS or seconds < PROBE_MIN_SECONDS:
        return None
    users = {}
    if test.get("samples") and test.get("seconds"):
        users = {1: test["samples"] / test["seconds"]}
    startup = max(0.0, now - started - seconds - float(test.get("seconds", 0.0)))
    planned = fit.get("planned_steps") or steps
    return Rates({1: steps / seconds}, users, startup), min(1.0, steps / max(planned, 1))


# -------------------------------------------------------------------------------------------- plan


def projected_plan(jobs: list[Job], rates: Rates | None, minutes: float, cap: int | None) -> list[str]:
    """The lines of a sitting's projected plan: which cell-seeds start when, side by side, and end when."""

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    scheduler = Scheduler(jobs, 60 * minutes, clock, rates, cap)
    if rates is None and any(j.kind == "llm" and j.seconds is None for j in jobs):
        return [
            "projected plan: no rates measured on this device yet: the first LLM cell-seed runs as a probe"
        ]
    finished, cut = replay(scheduler, clock, rates) if rates else ([], [])
    lines = [f"projected plan for {minutes:g} min (margin {scheduler.margin_s:.0f} s):"]
    for job, start, end in sorted(finished, key=lambda f: f[1]):
        lines.append(f"  {start / 60:5.1f} -> {end / 60:5.1f} min  {job.name} ({(end - start) / 60:.1f} min)")
    lines += [f"  not started: {job.name} ({why})" for job, why in scheduler.given_up]
    lines += [f"  cut: {name}" for name in cut]
    lines.append(f"  {len(finished)} of {len(jobs)} cell-seeds finish")
    return lines


# ------------------------------------------------------------------------------------------ the run


def _jobs(runner) -> list[tuple[Job, Cell, int]]:
    """The cell-seeds to run in value order: per seed, the LLM rows first, then the baselines."""
    run, out = runner.run, []
    for seed in run.seeds:
        for cell in sorted(runner.present, key=lambda c: c.kind != "llm"):
            if not runner.settled(cell, seed):
                out.append((cell, seed))
    jobs = []
    for cell, seed in out:
        seconds = runner.expected_seconds(cell)
        if seconds is None and cell.kind != "llm":
            seconds = runner.baseline_prior.get(cell.method)
        jobs.append((cell_job(cell, seed, run, seconds), cell, seed))
    return jobs


def run_budgeted(runner) -> None:
    """Run `runner`'s table within its budget: only cell-seeds projected to finish are started, as many
    LLM cell-seeds side by side as the rates say (`TableRunner` calls this when `minutes` is given)."""
    run = runner.run
    device = None if run.dry_run else device_name()
    recorded = recorded_rates(run.profile, device, [run.root.parent / t for t in TABLES])
    prior, runner.baseline_prior, where = prior_rates(run.profile, device)
    rates = merged_rates(recorded, prior)
    source = "finished runs" if recorded else ""
    source = " + ".join(x for x in (source, where) if x) or "none yet (a probe measures them)"
    runner.say(f"rates ({device or 'any device'}): {_describe(rates)}; from {source}")
    jobs = _jobs(runner)
    if run.dry_run:
        for _job, cell, seed in jobs:
            runner.lines.extend(runner.plan_block(cell, seed))
        runner.lines.extend(projected_plan([j for j, _, _ in jobs], rates, run.minutes or 0.0, run.jobs))
        return
    by_name = {job.name: (job, cell, seed) for job, cell, seed in jobs}
    scheduler = Scheduler([j for j, _, _ in jobs], runner.deadline, time.time, rates, run.jobs)
    futures: dict[Future, str] = {}
    started: dict[str, float] = {}
    widest: dict[str, int] = {}  # most LLM cell-seeds side by side during each run
    stopped: set[str] = set()
    runner.pool = ThreadPoolExecutor(max_workers=16)  # stopped by the runner if interrupted
    while True:
        decision = scheduler.decide()
        for job, why in decision.give_up:
            runner.left.append(f"{job.name} ({why})")
            runner.say(f"{job.name}: left for another sitting ({why})")
        for job, why in decision.stop:
            stopped.add(job.name)
            runner.left.append(f"{job.name} (stopped: {why})")
            runner.say(f"{job.name}: stopped, it cannot finish ({why})")
            runner.stop(job.name)
        for job in decision.start:
            _, cell, seed = by_name[job.name]
            started[job.name] = time.time()
            futures[runner.submit(cell, seed, lambda n=job.name: widest.get(n, 1))] = job.name
        llm = [n for n in futures.values() if by_name[n][0].kind == "llm"]
        for name in llm:
            widest[name] = max(widest.get(name, 1), len(llm))
        if not futures:
            for job in list(scheduler.pending):  # nothing runs and nothing could start
                runner.left.append(f"{job.name} (the time budget is spent)")
                runner.say(f"{job.name}: left for another sitting (the time budget is spent)")
            runner.pool.shutdown(wait=True)
            return
        finished, _ = wait(list(futures), timeout=5, return_when=FIRST_COMPLETED)
        for future in finished:
            name = futures.pop(future)
            scheduler.finished(by_name[name][0])
            runner.collected(name, future, quiet=name in stopped)
        if scheduler.rates is None or not scheduler.rates.complete:
            _probe(scheduler, runner, llm, started)


def _probe(scheduler: Scheduler, runner, llm: list[str], started: dict[str, float]) -> None:
    """Feed a lone probe's measured rate to the scheduler."""
    if len(llm) != 1 or llm[0] not in started:
        return
    cell, seed = next(
        (c, s) for c in runner.present for s in runner.run.seeds if f"{c.name} seed{s}" == llm[0]
    )
    got = probe_rates(cell.run_dir(runner.run.root, seed), started[llm[0]], time.time())
    if got is not None:
        rates, done = got
        scheduler.measured(merged_rates(rates, scheduler.rates), {llm[0]: done})


def _describe(rates: Rates | None) -> str:
    if rates is None:
        return "unknown"
    steps = ", ".join(f"{v:.2f} steps/s x{k}" for k, v in sorted(rates.steps_per_s.items()))
    users = (
        ", ".join(f"{v:.1f} samples/s x{k}" for k, v in sorted(rates.users_per_s.items()))
        or "decoding unknown"
    )
    return f"fit {steps}; test {users}; start-up {rates.startup_s:.0f} s"
