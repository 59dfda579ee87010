"""A sitting's steps: each a subprocess with its own log file and time limit, in a process group of its
own that dies with the sitting, all within one budget (`Session`); one line per step in ``summary.txt``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iamrec.tables.writer import popen

PACK_RESERVE_S = 20  # kept free for packing at the end of a budget
KILL_GRACE_S = 60  # SIGTERM to SIGKILL
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


@dataclass
class Step:
    name: str
    status: str  # "ok", "failed (rc N)", "timed out after N s", "skipped: why"
    seconds: float
    log: str


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
                proc = popen(  # dies with the sitting (Linux), in a process group of its own
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
