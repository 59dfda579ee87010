"""The run folder: what an iamrec run writes, and how the others find it. The only module that spells
these file names; the LightningModule, both baselines, `iamrec.reproduce` and `iamrec.results` go
through it.

One run (``trainer.default_root_dir``; under ``iamrec.reproduce``, ``<root>/<dataset>/<method>/seed<k>/``)::

    checkpoints/last.ckpt                     every fit, every ``checkpoint.every_n_train_steps`` optimizer
                                              steps and at its end: ``--ckpt_path last`` resumes it (the
                                              same batches and dropout masks as an uninterrupted run), or
                                              tests it from a new process
    checkpoints/best.ckpt                     the LLM's weights at its best validation so far
                                              (``best_checkpoint.monitor``, default ``val/loss``, lowest),
                                              saved right after that validation; ``--ckpt_path best``
    checkpoints/best-*.ckpt                   SASRec only: the best validation epoch (what is tested)
    lightning_logs/version_<n>/test_metrics.json, predictions.parquet
                                              each ``test`` stage (`write_test_outputs`)
    lightning_logs/version_<n>/recommendations.jsonl
                                              each ``predict`` stage (`write_recommendations`; the lines
                                              are described in `iamrec.predict`)
    test_metrics.json, predictions.parquet    the newest test outputs, copied up by `iamrec.reproduce`
                                              (most-popular writes them here directly)
    FIT_DONE                                  the fit stage finished (not redone on a rerun)
    DONE                                      JSON {profile, commands, seconds[, reused_from]}: finished

``<root>/<dataset>/<method>/MISSING`` marks a table cell whose inputs are absent (text: why).

``test_metrics.json``: ``{"HR@K": ..., "NDCG@K": ..., "users": n, "invalid_rate": ...}`` (the LLM adds
``distinct_items`` and ``schedule``). ``predictions.parquet``: one row per test sample, the columns of
`PREDICTION_COLUMNS`; ``rank`` is the 0-based rank of the true item (-1: not in the top K).

Every file here is written atomically (a temporary name in the same folder, fsync, `os.replace`): a
run killed or out of disk space mid-write leaves the previous file, never a truncated one under the final
name. Checkpoints go through `iamrec.run_checkpoints` (`RunCheckpoint`, a ModelCheckpoint, and its
`AtomicCheckpointIO`), which also finds and checks them (``--ckpt_path``); this module imports neither
torch nor Lightning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

METRICS_FILE = "test_metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
TEST_OUTPUTS = (METRICS_FILE, PREDICTIONS_FILE)
RECOMMENDATIONS_FILE = "recommendations.jsonl"
DONE = "DONE"
FIT_DONE = "FIT_DONE"
MISSING = "MISSING"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"

# predictions.parquet, every method: sample_index (row of samples.parquet), user_id, target, rank, and
# top_items (the recommended item ids, best first; the LLM names each beam by the smallest item id its
# title names, -1 for a title outside the catalogue).
PREDICTION_COLUMNS = ("sample_index", "user_id", "target", "rank", "top_items")
# The LLM adds invalid_beams: its beams whose title names no item (impossible with the trie).
LLM_PREDICTION_COLUMNS = (*PREDICTION_COLUMNS, "invalid_beams")

_SEED_DIR = re.compile(r"^seed(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is absent, unreadable or unfit for the command (the message names the file)."""


class MarkerError(ValueError):
    """A ``DONE`` marker that is not a valid record (truncated or corrupt; the message names the file)."""


# --------------------------------------------------------------------------------------- atomic writes


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is flushed, fsynced and renamed
    onto `path` (`os.replace`), on any error removed (`path` keeps its old contents). Temporary files a
    killed writer left for `path` are removed first."""
    path = Path(path)
    for stale in path.parent.glob(f".{_glob_escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = _temp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


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
    with atomic_open(run_dir / PREDICTIONS_FILE) as f:  # first: test_metrics.json marks complete outputs
        predictions.to_parquet(f, index=False)
    write_atomic(run_dir / METRICS_FILE, json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
    print(format_metrics_table({method: metrics}))
    if "distinct_items" in metrics and len(predictions):
        print(
            f"distinct catalogue items per sample in the top {len(predictions['top_items'].iloc[0])}: "
            f"{metrics['distinct_items']:.2f} on average (beam search repeats an answer in slots it cannot fill)"
        )
    print(f"wrote {run_dir / METRICS_FILE} and {run_dir / PREDICTIONS_FILE}")


def write_recommendations(run_dir: str | Path, records: list[Mapping[str, Any]]) -> Path:
    """Write ``recommendations.jsonl`` (one JSON object per record) into `run_dir` atomically; its path."""
    path = Path(run_dir) / RECOMMENDATIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


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
    for name in (PREDICTIONS_FILE, METRICS_FILE):  # test_metrics.json last: it marks complete outputs
        with open(Path(source) / name, "rb") as src, atomic_open(Path(run_dir) / name) as dst:
            shutil.copyfileobj(src, dst)


# ------------------------------------------------------------------------------------------ markers


def is_done(run_dir: str | Path) -> bool:
    """A finished run: a valid ``DONE`` record and its ``test_metrics.json`` (a corrupt ``DONE`` is not done)."""
    return has_test_outputs(run_dir) and (Path(run_dir) / DONE).is_file() and done_problem(run_dir) is None


def read_done(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``DONE`` record of a run (``{}`` for an empty marker), or None when there is none; a
    `MarkerError` naming the file when it is not a JSON object (e.g. truncated)."""
    path = Path(run_dir) / DONE
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    try:
        record = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise MarkerError(
            f"{path} is not a valid DONE record (truncated or corrupt JSON: {err.msg})."
        ) from None
    if not isinstance(record, dict):
        raise MarkerError(
            f"{path} is not a valid DONE record (a JSON {type(record).__name__}, not an object)."
        )
    return record


def done_problem(run_dir: str | Path) -> str | None:
    """Why the ``DONE`` marker of `run_dir` is unusable (`read_done`'s sentence), or None (valid or absent)."""
    try:
        read_done(run_dir)
    except MarkerError as err:
        return str(err)
    return None


def clear_done(run_dir: str | Path) -> None:
    """Remove the ``DONE`` marker (e.g. a corrupt one, before the run is redone)."""
    (Path(run_dir) / DONE).unlink(missing_ok=True)


def mark_done(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    write_atomic(Path(run_dir) / DONE, json.dumps(dict(record), indent=2) + "\n")


def is_fit_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / FIT_DONE).is_file()


def mark_fit_done(run_dir: str | Path) -> None:
    write_atomic(Path(run_dir) / FIT_DONE, "")


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
