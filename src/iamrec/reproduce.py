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

How each cell-seed runs, resumes and is reused: `iamrec.tables.runner`; the cells, profiles and
commands: `iamrec.tables.plan`; the report: `iamrec.tables.report`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from iamrec.errors import PARTIAL, guarded
from iamrec.tables.plan import DATASETS, PROFILES, TABLES, TableRun
from iamrec.tables.report import update_headers
from iamrec.tables.runner import CellFailed, reproduce

PROGRAM = "iamrec.reproduce"


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
        help="time budget: start only the cell-seeds projected to finish within it (from measured rates: "
        "iamrec.tables.budget); the report lists what is left and the command that continues",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="at most this many cell-seeds at once, sharing the GPU (default: 1 without --minutes; within a "
        "budget, as many as the measured rates say); each then logs to <seed dir>/reproduce.log",
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
        guarded(lambda: _run(args, datasets), PROGRAM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, datasets: list[str]) -> None:
    methods = [m for m in args.methods.replace(" ", ",").split(",") if m] if args.methods else None
    run = TableRun(
        args.table,
        datasets,
        args.seeds,
        args.profile,
        args.root,
        args.out,
        methods,
        args.minutes,
        args.jobs,
        args.dry_run,
    )
    try:
        print(reproduce(run))
    except CellFailed as err:
        print(err.report)
        print(f"{PROGRAM}: {err}", file=sys.stderr)
        raise SystemExit(PARTIAL) from None
    if args.update_headers and not args.dry_run:
        for path in update_headers(args.table, datasets, args.seeds, args.profile, run.root):
            print(f"updated the '# Measured' line of {path}")


if __name__ == "__main__":
    main()
