"""How fast a run goes: a Lightning callback that writes ``<run>/timing.json`` while it trains and tests.

    {"fit":  {"steps": 620, "first_step": 0, "planned_steps": 1238, "seconds": 171.2, "finished": false},
     "test": {"samples": 9905, "planned_samples": 9905, "seconds": 74.9, "finished": true},
     "device": "NVIDIA H200"}

``seconds`` count from the stage's first batch (``first_step``: the step it resumed from) (start-up, model loading and data set-up excluded: whoever
started the process knows its wall time, and the difference is the start-up). The file is rewritten at
most every `every_s` seconds and when a stage ends (rank 0 only, atomically), so a scheduler can read the
rate of a run that is still going (`steps / seconds`) and project when it ends. Reading it costs the run
nothing on the GPU: the counts are Python integers Lightning already holds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from iamrec.run_folder import write_atomic

TIMING_FILE = "timing.json"


def read_timing(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``timing.json`` ({} when absent or unreadable: a run that has not started a batch yet)."""
    path = Path(run_dir) / TIMING_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class StageTimer(Callback):
    """Writes ``<trainer.default_root_dir>/timing.json``: steps and seconds of `fit`, samples and seconds of
    `test`.

    Args:
        every_s: Rewrite the file at most this often while a stage runs (seconds).
    """

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._start: dict[str, float] = {}
        self._written = 0.0
        self._samples = 0
        self._first_step = 0

    def _write(self, trainer, stage: str, record: dict[str, Any], force: bool = False) -> None:
        now = time.perf_counter()
        if not trainer.is_global_zero or (not force and now - self._written < self.every_s):
            return
        self._written = now
        path = Path(trainer.default_root_dir) / TIMING_FILE
        data = read_timing(path.parent)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        data.update({stage: record, "device": device})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1) + "\n")

    def _seconds(self, stage: str) -> float:
        return round(time.perf_counter() - self._start[stage], 3)

    # -------------------------------------------------------------------------------------------- fit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "fit" not in self._start:
            self._start["fit"] = time.perf_counter()
            self._first_step = int(trainer.global_step)  # > 0 when resuming

    def _fit_record(self, trainer, finished: bool) -> dict[str, Any]:
        planned = trainer.estimated_stepping_batches
        return {
            "steps": int(trainer.global_step),
            "first_step": self._first_step,
            "planned_steps": int(planned) if planned != float("inf") else None,
            "seconds": self._seconds("fit"),
            "finished": finished,
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, "fit", self._fit_record(trainer, False))

    def on_train_end(self, trainer, pl_module) -> None:
        if "fit" in self._start:
            self._write(trainer, "fit", self._fit_record(trainer, True), force=True)

    # ------------------------------------------------------------------------------------------- test

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start.setdefault("test", time.perf_counter())

    def _test_record(self, trainer, finished: bool) -> dict[str, Any]:
        planned = sum(len(dl.dataset) for dl in _loaders(trainer.test_dataloaders) if hasattr(dl, "dataset"))
        return {
            "samples": self._samples,
            "planned_samples": planned or None,
            "seconds": self._seconds("test"),
            "finished": finished,
        }

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        first = next(iter(batch.values())) if isinstance(batch, dict) and batch else None
        self._samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 0
        self._write(trainer, "test", self._test_record(trainer, False))

    def on_test_end(self, trainer, pl_module) -> None:
        if "test" in self._start:
            self._write(trainer, "test", self._test_record(trainer, True), force=True)


def _loaders(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
