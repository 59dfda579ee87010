"""Which cell-seeds to start within a time budget, and how many side by side: only what can finish.

A cell-seed's duration is projected from measured rates (`Rates`): start-up, then ``fit steps / steps per
second``, then ``test samples / samples per second``, where the rates are those of ``k`` LLM cell-seeds
sharing the GPU. Rates come from earlier finished runs on the same device (their ``DONE`` records) or,
in a sitting with none, from the first run's own ``timing.json`` (a probe: it is stopped as soon as its
projection shows it cannot finish).

`Scheduler.decide` is called whenever something changed (a start, an end, a new measurement). It starts,
in value order, every pending cell-seed whose projected end — and the projected end of every LLM
cell-seed already running, slowed by one more beside it — falls before the deadline less a margin. A
cell-seed that cannot finish even alone is given up at once (the rest still get their chance: greedy in
value order). With one slot and exact durations this finishes exactly the cell-seeds the offline greedy
over the same order finishes (tested with a fake clock).

How many LLM cell-seeds share the GPU is chosen from the rates: the measured level with the highest total
throughput (``k x steps/s at k``), and one level above it to learn from, projected pessimistically (the
total throughput does not grow: each of ``k + 1`` runs at ``k / (k + 1)`` of its speed at ``k``).
Baselines (most-popular, SASRec) run in a lane of their own beside the LLM cells and fill the gaps; one
never timed (no finished seed, no prior in ``results/<profile>/rates.json``) is started as a probe of that
lane and cut if it is still running at the deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

MARGIN_S = 30.0  # kept free before the deadline: projections are means, runs vary by a few percent


@dataclass(frozen=True)
class Rates:
    """Measured speed of the LLM cell-seeds on one device.

    Attributes:
        steps_per_s: k -> optimizer steps per second of EACH of k fits side by side (validation included).
        users_per_s: k -> test samples per second of each of k tests side by side (decoding included).
        startup_s: seconds of start-up per cell-seed (two processes: imports, model, data), outside both.
    """

    steps_per_s: Mapping[int, float]
    users_per_s: Mapping[int, float]
    startup_s: float

    def __post_init__(self) -> None:
        for name, rates in (("steps_per_s", self.steps_per_s), ("users_per_s", self.users_per_s)):
            if any(k < 1 or not (v > 0 and math.isfinite(v)) for k, v in rates.items()):
                raise ValueError(f"Rates.{name} needs positive finite rates keyed by k >= 1, got {rates}.")
        if not self.steps_per_s:
            raise ValueError("Rates.steps_per_s needs at least one measured level.")

    @property
    def complete(self) -> bool:
        """False while only the fit is measured (a probe still training): its decoding counts as 0 s."""
        return bool(self.users_per_s)

    @staticmethod
    def _at(rates: Mapping[int, float], k: int) -> float:
        """The rate at k: measured, else from the nearest measured level below (or above) with the total
        throughput held constant (pessimistic above, optimistic below is avoided: below uses the level's
        own rate, never faster)."""
        if k in rates:
            return rates[k]
        below = [j for j in rates if j < k]
        if below:
            j = max(below)
            return rates[j] * j / k
        return rates[min(rates)]  # fewer side by side than any measured level: at least as fast

    def seconds(self, fit_steps: int, test_samples: int, k: int) -> float:
        """Projected wall time of one LLM cell-seed while k run side by side."""
        decode = test_samples / self._at(self.users_per_s, k) if self.users_per_s else 0.0
        return self.startup_s + fit_steps / self._at(self.steps_per_s, k) + decode

    def concurrency(self, cap: int | None = None) -> int:
        """How many LLM cell-seeds to run side by side: the measured level of highest total throughput,
        plus one to learn from; never above `cap`."""
        best = max(self.steps_per_s, key=lambda k: (k * self.steps_per_s[k], -k))
        return max(1, min(best + 1, cap)) if cap is not None else best + 1


@dataclass(frozen=True)
class Job:
    """One cell-seed to schedule.

    Attributes:
        name: "<table> <dataset>/<method> seed<k>" (what the log and the report say).
        kind: "llm" (shares the GPU with the other LLM cell-seeds) or "baseline" (its own lane).
        fit_steps: optimizer steps of its fit (what is left of it when resuming).
        test_samples: test samples it decodes.
        seconds: a baseline's projected wall time (its cell's finished seeds, else the profile's prior);
            None: never timed (started as a probe when its lane is free).
    """

    name: str
    kind: str
    fit_steps: int = 0
    test_samples: int = 0
    seconds: float | None = None


@dataclass
class _Running:
    job: Job
    done: float = 0.0  # fraction of the work done (as projected)


@dataclass
class Decision:
    """What `Scheduler.decide` says: start these, give these up (with why), stop these probes (why)."""

    start: list[Job] = field(default_factory=list)
    give_up: list[tuple[Job, str]] = field(default_factory=list)
    stop: list[tuple[Job, str]] = field(default_factory=list)


class Scheduler:
    """Decides, at each event, which cell-seeds start (see the module docstring).

    Args:
        jobs: the cell-seeds in value order (most valuable first).
        deadline: the clock's time by which every started cell-seed must have finished.
        rates: the LLM rates, or None until a probe has measured them.
        cap: at most this many LLM cell-seeds side by side (None: chosen from the rates).
        margin_s: kept free before the deadline (at most 5% of the budget left at the start).
        clock: the time now (seconds; `time.time` in a real run, a fake in the tests).
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        deadline: float,
        clock: Callable[[], float],
        rates: Rates | None = None,
        cap: int | None = None,
        margin_s: float = MARGIN_S,
    ) -> None:
        self.pending = list(jobs)
        self.deadline, self.clock, self.rates, self.cap = deadline, clock, rates, cap
        self.margin_s = min(margin_s, 0.05 * max(deadline - clock(), 0.0))
        self.running: dict[str, _Running] = {}
        self.given_up: list[tuple[Job, str]] = []  # every cell-seed given up so far, with why
        self._last = clock()

    # ------------------------------------------------------------------------------- projections

    def _llm_running(self) -> list[_Running]:
        return [r for r in self.running.values() if r.job.kind == "llm"]

    def duration(self, job: Job, k: int) -> float | None:
        """Projected wall time of `job` with k LLM cell-seeds side by side (None: not known yet). An LLM
        cell-seed without rates but with finished seeds of its cell takes their mean, k times as long."""
        if job.kind != "llm":
            return job.seconds
        if self.rates is not None and (self.rates.complete or job.seconds is None):
            return self.rates.seconds(job.fit_steps, job.test_samples, k)
        return None if job.seconds is None else job.seconds * k

    def _advance(self) -> None:
        """Move each running cell-seed's projected progress to now, at the concurrency it ran at."""
        now = self.clock()
        k = max(1, len(self._llm_running()))
        for r in self.running.values():
            total = self.duration(r.job, k if r.job.kind == "llm" else 1)
            if total:
                r.done = min(1.0, r.done + (now - self._last) / total)
        self._last = now

    def _ends_in_time(self, k: int, extra: Job | None = None) -> bool:
        """Whether every running LLM cell-seed (and `extra`) ends before the deadline at concurrency k."""
        end = self.deadline - self.margin_s - self.clock()
        for r in self._llm_running():
            total = self.duration(r.job, k)
            if total is not None and (1 - r.done) * total > end:
                return False
        return extra is None or (self.duration(extra, k) or math.inf) <= end

    # ------------------------------------------------------------------------------------ events

    def started(self, job: Job) -> None:
        self._advance()
        self.pending.remove(job)
        self.running[job.name] = _Running(job)

    def finished(self, job: Job) -> None:
        self._advance()
        self.running.pop(job.name, None)

    def measured(self, rates: Rates, progress: Mapping[str, float] | None = None) -> None:
        """New rates (a probe's or a finished run's), and the running cell-seeds' measured progress."""
        self._advance()
        self.rates = rates
        for name, done in (progress or {}).items():
            if name in self.running:
                self.running[name].done = done

    def decide(self) -> Decision:
        """Start what fits, in value order; give up what can never fit; stop probes that cannot finish."""
        self._advance()
        out = Decision()
        end = self.deadline - self.margin_s - self.clock()
        for r in list(self._llm_running()):  # a probe started without rates, measured since
            total = self.duration(r.job, len(self._llm_running()))
            if total is not None and (1 - r.done) * total > end and len(self._llm_running()) == 1:
                out.stop.append((r.job, _late(r.job, (1 - r.done) * total, end)))
        lane_busy = any(r.job.kind != "llm" for r in self.running.values())
        measured = self.rates is not None and self.rates.complete
        cap = self.rates.concurrency(self.cap) if measured else 1  # a probe, or known seconds only: alone
        waiting_llm = False  # a more valuable LLM cell-seed waits: the lower ones do not pass it
        for job in list(self.pending):
            if job.kind != "llm":
                # a baseline never timed (no finished seed, no prior) is a probe of its own lane: started
                # when the lane is free, cut if it is still running at the deadline
                if job.seconds is not None and job.seconds > end or end <= 0:
                    out.give_up.append((job, _late(job, job.seconds, end)))
                    self.pending.remove(job)
                elif not lane_busy:
                    out.start.append(job)
                    self.started(job)
                    lane_busy = True
                continue
            if waiting_llm:
                continue
            k = len(self._llm_running())
            alone = self.duration(job, 1)
            if alone is None or (not measured and self.rates is not None):  # not measured yet: a probe
                if k == 0 and end > 0:
                    out.start.append(job)
                    self.started(job)
                waiting_llm = True
                continue
            if alone > end:
                out.give_up.append((job, _late(job, alone, end)))
                self.pending.remove(job)
                continue
            if (cap is None or k + 1 <= cap) and self._ends_in_time(k + 1, job):
                out.start.append(job)
                self.started(job)
            else:
                waiting_llm = True  # fits alone later: wait for a slot
        self.given_up += out.give_up
        return out


def _late(job: Job, seconds: float | None, left: float) -> str:
    if left <= 0:
        return "the time budget is spent"
    need = "an unknown time" if seconds is None or math.isinf(seconds) else f"{seconds / 60:.1f} min"
    return f"projected {need}, {max(left, 0) / 60:.1f} min left before the deadline and its margin"


def greedy(jobs: Sequence[Job], seconds: Callable[[Job], float], budget: float) -> list[str]:
    """The offline greedy over one slot: in value order, run each job that still fits. The names run."""
    t, run = 0.0, []
    for job in jobs:
        if t + seconds(job) <= budget:
            t += seconds(job)
            run.append(job.name)
    return run


def replay(
    scheduler: Scheduler, clock, true_rates: Rates
) -> tuple[list[tuple[Job, float, float]], list[str]]:
    """Play the scheduler's decisions against `true_rates` on a fake `clock` (an object whose ``now`` the
    replay moves): ([(job, start, end)] of the finished cell-seeds, names of those cut or stopped).

    Each running LLM cell-seed advances at 1 / (its true duration at the current concurrency) per second, a
    baseline at 1 / its seconds; one still running at the deadline is cut. With `true_rates` = the
    projected ones, this is the projected plan of a sitting (`python -m iamrec.reproduce --dry-run`)."""
    done: dict[str, float] = {}
    started: dict[str, float] = {}
    running: dict[str, Job] = {}
    finished: list[tuple[Job, float, float]] = []
    cut: list[str] = []

    def seconds(job: Job, k: int) -> float:
        return job.seconds if job.kind != "llm" else true_rates.seconds(job.fit_steps, job.test_samples, k)

    while True:
        decision = scheduler.decide()
        for job in decision.start:
            running[job.name], done[job.name], started[job.name] = job, 0.0, clock.now
        for job, _why in decision.stop:
            running.pop(job.name)
            scheduler.finished(job)
            cut.append(job.name)
        if not running:
            return finished, cut
        k = max(1, sum(j.kind == "llm" for j in running.values()))
        left = {n: (1 - done[n]) * seconds(j, k if j.kind == "llm" else 1) for n, j in running.items()}
        name = min(left, key=left.get)
        step = left[name]
        if clock.now + step > scheduler.deadline:  # the budget ends first: everything running is cut
            return finished, cut + list(running)
        clock.now += step
        for n, j in running.items():
            done[n] += step / seconds(j, k if j.kind == "llm" else 1)
        job = running.pop(name)
        scheduler.finished(job)
        finished.append((job, started[name], clock.now))
