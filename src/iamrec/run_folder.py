"""The run folder: what an iamrec run writes, and how the others find it. The only module that spells
these file names; the LightningModule, both baselines, `iamrec.reproduce` and `iamrec.results` go
through it.

One run (``trainer.default_root_dir``; under ``iamrec.reproduce``, ``<root>/<dataset>/<method>/seed<k>/``)::

    checkpoints/last.ckpt                     every fit: ``--ckpt_path last`` resumes it, or tests it
                                              from a new process
    checkpoints/best-*.ckpt                   SASRec only: the best validation epoch (what is tested)
    lightning_logs/version_<n>/test_metrics.json, predictions.parquet
                                              each ``test`` stage (`write_test_outputs`)
    test_metrics.json, predictions.parquet    the newest test outputs, copied up by `iamrec.reproduce`
                                              (most-popular writes them here directly)
    FIT_DONE                                  the fit stage finished (not redone on a rerun)
    DONE                                      JSON {profile, commands, seconds[, reused_from]}: finished

``<root>/<dataset>/<method>/MISSING`` marks a table cell whose inputs are absent (text: why).

``test_metrics.json``: ``{"HR@K": ..., "NDCG@K": ..., "users": n, "invalid_rate": ...}`` (the LLM adds
``distinct_items`` and ``schedule``). ``predictions.parquet``: one row per test sample, the columns of
`PREDICTION_COLUMNS`; ``rank`` is the 0-based rank of the true item (-1: not in the top K).

Lightning-free: `add_run_checkpoint` imports its callback when called.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

METRICS_FILE = "test_metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
TEST_OUTPUTS = (METRICS_FILE, PREDICTIONS_FILE)
DONE = "DONE"
FIT_DONE = "FIT_DONE"
MISSING = "MISSING"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"

# predictions.parquet, every method: sample_index (row of samples.parquet), user_id, target, rank, and
# top_items (the recommended item ids, best first; the LLM names each beam by the smallest item id its
# title names, -1 for a title outside the catalogue).
PREDICTION_COLUMNS = ("sample_index", "user_id", "target", "rank", "top_items")
# The LLM adds invalid_beams: its beams whose title names no item (impossible with the trie).
LLM_PREDICTION_COLUMNS = (*PREDICTION_COLUMNS, "invalid_beams")

_SEED_DIR = re.compile(r"^seed(\d+)$")


# ------------------------------------------------------------------------------------ where things are


def seed_dir(root: str | Path, dataset: str, method: str, seed: int) -> Path:
    """``<root>/<dataset>/<method>/seed<seed>``: one table cell x seed."""
    return Path(root) / dataset / method / f"seed{seed}"


def missing_marker(root: str | Path, dataset: str, method: str) -> Path:
    """``<root>/<dataset>/<method>/MISSING``: the marker of a cell whose inputs are absent."""
    return Path(root) / dataset / method / MISSING


def checkpoint_dir(root: str | Path | None) -> str:
    """``<default_root_dir>/checkpoints`` (a str: LightningCLI links it into ``checkpoint.dirpath``)."""
    return os.path.join(root or ".", CHECKPOINTS)


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(checkpoint_dir(run_dir)) / LAST_CHECKPOINT


def best_checkpoints(run_dir: str | Path) -> list[Path]:
    """SASRec's ``best-*.ckpt`` files, sorted by name (the newest epoch last)."""
    return sorted(Path(checkpoint_dir(run_dir)).glob("best-*.ckpt"))


def add_run_checkpoint(parser, **defaults: Any) -> None:
    """Add a ``checkpoint`` ModelCheckpoint group saving ``last.ckpt`` under ``<default_root_dir>/checkpoints``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults({"checkpoint.save_last": True, **{f"checkpoint.{k}": v for k, v in defaults.items()}})
    parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)


# ------------------------------------------------------------------------------------- test outputs


def format_metrics_table(rows: Mapping[str, Mapping[str, Any]], ks: tuple[int, ...] | None = None) -> str:
    """A small fixed-width table: one row per method, HR@K and NDCG@K columns (default: the K of the
    first row's ``HR@K`` entries)."""
    if ks is None:
        first = next(iter(rows.values()), {})
        ks = tuple(sorted(int(k[3:]) for k in first if k.startswith("HR@") and k[3:].isdigit()))
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    lines = [f"{'method':<14}" + "".join(f"{c:>9}" for c in cols) + f"{'users':>7}"]
    for name, m in rows.items():
        cells = "".join(f"{m.get(c, float('nan')):>9.4f}" for c in cols)
        lines.append(f"{name:<14}{cells}{int(m.get('users', 0)):>7}")
    return "\n".join(lines)


def write_test_outputs(
    run_dir: str | Path, metrics: Mapping[str, Any], predictions: pd.DataFrame, method: str = "model"
) -> None:
    """Write ``test_metrics.json`` and ``predictions.parquet`` into `run_dir` and print the metrics table
    (one row, named `method`)."""
    run_dir = Path(run_dir)
    absent = [c for c in ("user_id", "rank") if c not in predictions.columns]
    if absent:
        raise ValueError(f"predictions lack the column(s) {absent}; iamrec.results pairs users by them.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
    predictions.to_parquet(run_dir / PREDICTIONS_FILE, index=False)
    print(format_metrics_table({method: metrics}))
    if "distinct_items" in metrics and len(predictions):
        print(
            f"distinct catalogue items per sample in the top {len(predictions['top_items'].iloc[0])}: "
            f"{metrics['distinct_items']:.2f} on average (beam search repeats an answer in slots it cannot fill)"
        )
    print(f"wrote {run_dir / METRICS_FILE} and {run_dir / PREDICTIONS_FILE}")


def has_test_outputs(run_dir: str | Path) -> bool:
    return (Path(run_dir) / METRICS_FILE).is_file()


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """``test_metrics.json`` of a run, with an error naming the file when it is not JSON."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun that cell.") from err


def read_predictions(run_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame | None:
    """``predictions.parquet`` of a run (those `columns`), or None when the run wrote none."""
    import pandas as pd

    path = Path(run_dir) / PREDICTIONS_FILE
    return pd.read_parquet(path, columns=columns) if path.is_file() else None


def latest_test_outputs(run_dir: str | Path) -> Path:
    """The ``lightning_logs/version_*`` folder of the newest test stage under `run_dir`."""
    found = sorted(
        Path(run_dir).glob(f"lightning_logs/version_*/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise FileNotFoundError(f"the test stage wrote no {METRICS_FILE} under {run_dir}/lightning_logs.")
    return found[-1].parent


def copy_test_outputs(source: str | Path, run_dir: str | Path) -> None:
    """Copy ``test_metrics.json`` and ``predictions.parquet`` from `source` into `run_dir`."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for name in TEST_OUTPUTS:
        shutil.copy2(Path(source) / name, Path(run_dir) / name)


# ------------------------------------------------------------------------------------------ markers


def is_done(run_dir: str | Path) -> bool:
    """A finished run: ``DONE`` and its ``test_metrics.json``."""
    return (Path(run_dir) / DONE).is_file() and has_test_outputs(run_dir)


def read_done(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``DONE`` record of a run (``{}`` for an empty marker), or None when there is none."""
    path = Path(run_dir) / DONE
    return json.loads(path.read_text() or "{}") if path.is_file() else None


def mark_done(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    (Path(run_dir) / DONE).write_text(json.dumps(dict(record), indent=2) + "\n")


def is_fit_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / FIT_DONE).is_file()


def mark_fit_done(run_dir: str | Path) -> None:
    (Path(run_dir) / FIT_DONE).write_text("")


def missing_markers(root: str | Path) -> Iterator[tuple[str, str]]:
    """(cell path relative to `root`, reason) for every ``MISSING`` marker under `root`."""
    root = Path(root)
    if root.is_dir():
        for marker in sorted(root.rglob(MISSING)):
            yield marker.parent.relative_to(root).as_posix(), marker.read_text().strip()


def has_results(folder: str | Path) -> bool:
    """Whether any run below `folder` wrote its test outputs."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.rglob(METRICS_FILE))


def finished_runs(root: str | Path) -> Iterator[tuple[str, str, int, Path]]:
    """(dataset, method, seed, seed folder) of every seed folder holding ``test_metrics.json``, sorted."""
    for metrics_file in sorted(Path(root).glob(f"*/*/seed*/{METRICS_FILE}")):
        folder = metrics_file.parent
        match = _SEED_DIR.match(folder.name)
        if match is not None:
            yield folder.parent.parent.name, folder.parent.name, int(match.group(1)), folder
