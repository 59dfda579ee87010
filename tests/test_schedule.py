"""The sitting's scheduler on a fake clock: nothing starts that cannot finish, and within a budget it
finishes as many whole cell-seeds as the offline greedy over the same value order."""

from __future__ import annotations

import random

import pytest

from iamrec.tables.schedule import Job, Rates, Scheduler, greedy, replay


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(scheduler: Scheduler, clock: Clock, true_rates: Rates):
    """(finished names, cut names) of the scheduler's decisions played against 'true' rates."""
    finished, cut = replay(scheduler, clock, true_rates)
    return [job.name for job, _, _ in finished], cut


RATES = Rates(steps_per_s={1: 8.0}, users_per_s={1: 130.0}, startup_s=40.0)


def llm_jobs(rng: random.Random, n: int) -> list[Job]:
    return [
        Job(f"llm{i}", "llm", fit_steps=rng.randint(100, 1300), test_samples=rng.randint(100, 9905))
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(20))
def test_one_slot_exact_rates_finish_what_the_offline_greedy_finishes(seed: int) -> None:
    rng = random.Random(seed)
    jobs = llm_jobs(rng, rng.randint(3, 12))
    minutes = rng.uniform(2, 15)
    clock = Clock()
    scheduler = Scheduler(jobs, deadline=60 * minutes, clock=clock, rates=RATES, cap=1, margin_s=30)
    finished, cut = simulate(scheduler, clock, RATES)
    assert cut == []  # nothing started that could not finish
    budget = 60 * minutes - scheduler.margin_s
    expected = greedy(jobs, lambda j: RATES.seconds(j.fit_steps, j.test_samples, 1), budget)
    assert finished == expected


@pytest.mark.parametrize("seed", range(20))
def test_side_by_side_never_starts_what_cannot_finish(seed: int) -> None:
    """Projected rates measured at k = 1 and 3; the true GPU is at least as fast as projected (the
    pessimistic level above the best measured one included) — every started cell-seed finishes."""
    rng = random.Random(100 + seed)
    projected = Rates(steps_per_s={1: 8.4, 3: 3.6}, users_per_s={1: 130.0, 3: 60.0}, startup_s=45.0)
    speedup = rng.uniform(1.0, 1.3)
    true = Rates(
        steps_per_s={k: v * speedup for k, v in {1: 8.4, 2: 5.0, 3: 3.6, 4: 2.9}.items()},
        users_per_s={k: v * speedup for k, v in {1: 130.0, 2: 85.0, 3: 60.0, 4: 47.0}.items()},
        startup_s=45.0,
    )
    jobs = llm_jobs(rng, 9)
    jobs.insert(3, Job("popular", "baseline", seconds=20.0))
    jobs.insert(4, Job("sasrec", "baseline", seconds=rng.uniform(60, 200)))
    clock = Clock()
    scheduler = Scheduler(jobs, deadline=60 * rng.uniform(3, 14), clock=clock, rates=projected)
    finished, cut = simulate(scheduler, clock, true)
    assert cut == [] and finished  # what started finished; something did


def test_concurrency_is_chosen_from_measured_rates() -> None:
    assert Rates({1: 8.0}, {1: 100.0}, 30).concurrency() == 2  # alone measured: try two
    # three side by side gave 3 x 3.6 = 10.8 steps/s against 8.4 alone: three is best, four to learn from
    rates = Rates({1: 8.4, 3: 3.6}, {1: 130.0, 3: 60.0}, 45)
    assert rates.concurrency() == 4 and rates.concurrency(cap=2) == 2
    # an unmeasured level above is projected with the total throughput held: each at k/(k+1) speed
    assert rates.seconds(1000, 0, 4) == pytest.approx(45 + 1000 / (3.6 * 3 / 4))
    saturated = Rates({1: 9.0, 2: 4.4}, {1: 100.0, 2: 50.0}, 30)  # two give less than one: stay at 1 (+1)
    assert saturated.concurrency() == 2
    with pytest.raises(ValueError, match="steps_per_s"):
        Rates({1: float("nan")}, {1: 1.0}, 0)


def test_a_cell_seed_that_cannot_finish_is_given_up_and_the_next_ones_still_run() -> None:
    clock = Clock()
    long = Job("long", "llm", fit_steps=100_000, test_samples=10)
    short = Job("short", "llm", fit_steps=100, test_samples=10)
    scheduler = Scheduler([long, short], deadline=600, clock=clock, rates=RATES, cap=1)
    decision = scheduler.decide()
    assert [j.name for j in decision.start] == ["short"]
    assert [j.name for j, _ in decision.give_up] == ["long"]
    assert "projected 209.0 min, 9.5 min left" in decision.give_up[0][1]


def test_without_rates_one_probe_runs_and_is_stopped_once_measured_too_slow() -> None:
    clock = Clock()
    jobs = [
        Job("a", "llm", fit_steps=1200, test_samples=9905),
        Job("b", "llm", fit_steps=50, test_samples=50),
    ]
    scheduler = Scheduler(jobs, deadline=300, clock=clock)
    assert [j.name for j in scheduler.decide().start] == ["a"]  # the probe, alone
    assert scheduler.decide().start == []  # nothing beside a probe
    clock.now = 30.0
    scheduler.measured(RATES, progress={"a": 0.01})  # 8 steps/s: 1200 steps + 9905 samples need ~5 min
    decision = scheduler.decide()
    assert [j.name for j, _ in decision.stop] == ["a"]
    scheduler.finished(jobs[0])
    assert [j.name for j in scheduler.decide().start] == ["b"]


def test_a_baseline_never_timed_is_probed_in_its_lane_not_given_up() -> None:
    """No finished seed and no prior: the baseline still starts when its lane is free (it may be cut at
    the deadline), one at a time; with the budget spent it is given up."""
    clock = [0.0]
    jobs = [Job("popular", "baseline"), Job("sasrec", "baseline")]
    sched = Scheduler(jobs, deadline=600.0, rates=None, clock=lambda: clock[0])
    first = sched.decide()
    assert [j.name for j in first.start] == ["popular"] and not first.give_up
    assert sched.decide().start == []  # the lane is busy
    sched.finished(first.start[0])
    assert [j.name for j in sched.decide().start] == ["sasrec"]
    late = Scheduler([Job("popular", "baseline")], deadline=600.0, rates=None, clock=lambda: 600.0)
    assert [j.name for j, _ in late.decide().give_up] == ["popular"]
