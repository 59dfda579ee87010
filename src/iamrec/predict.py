"""`iamrec predict`: the callback that writes ``recommendations.jsonl`` into the run's log folder.

`IAMRecModule.predict_step` decodes each prompt (`iamrec.decoding.search`) and returns its distinct
catalogue answers (`Recommendation.as_dict`); `RecommendationWriter` (the CLI's ``recommend`` group: ``--recommend.top_k``) gathers
them from every process and writes one JSON object per line, in input order:

over a split (``data.predict_split``, the rows `iamrec test` scores)::

    {"sample_index": 79012, "user": 13, "history": ["Toy Story (1995)", ...], "history_used": 10,
     "target": {"item_id": 49, "title": "Heat (1995)"},
     "recommendations": [{"item_id": 49, "title": "Heat (1995)", "score": -3.21}, ...]}

over a histories file (``data.predict_file``), one output line per non-blank input line::

    {"line": 1, "user": "alice", "history": [...], "history_used": 2, "recommendations": [...]}
    {"line": 2, "user": null, "error": "unknown title 'Toy Stroy (1995)'; closest catalogue titles: ..."}

``history`` is every given item's title, oldest first; ``history_used`` how many of the most recent ones
the prompt holds (``data.max_items``, ``data.max_length``); ``recommendations`` the top ``top_k`` items
(see `iamrec.recommend` for scores and duplicate titles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from iamrec import run_folder
from iamrec.data.histories import HistoryDataset, longest_answer
from iamrec.metrics import all_processes


class RecommendationWriter(L.Callback):
    """Writes ``recommendations.jsonl`` at the end of `predict` (see the module docstring).

    Args:
        top_k: Recommendations per history (at most ``model.num_beams``).
        exclude_history: Drop recommended items whose title is in the history (the model may name an item
            the user already has); a list can then hold fewer than ``top_k`` items. Off by default: the
            test metrics score the beams as they are.
    """

    def __init__(self, top_k: int = 10, exclude_history: bool = False) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"recommend.top_k must be an integer >= 1, got {top_k!r}.")
        self.top_k = top_k
        self.exclude_history = exclude_history
        self._rows: list[tuple[int, list[dict[str, Any]]]] = []
        self.written: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        beams = getattr(pl_module.hparams, "num_beams", None)
        if stage == "predict" and beams is not None and self.top_k > beams:
            raise ValueError(
                f"recommend.top_k={self.top_k} exceeds model.num_beams={beams}; beam search returns at most "
                "num_beams items (raise --model.num_beams)."
            )

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_predict_batch_end(
        self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._rows += list(zip(outputs["sample_index"], outputs["recommendations"]))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = all_processes(self._rows)
        log_dir = Path(trainer.log_dir or ".")  # a collective (broadcast): every rank asks
        if not trainer.is_global_zero:
            return
        by_index = dict(rows)  # the distributed sampler repeats a few samples: each once
        records = self.records(trainer.datamodule, by_index)
        self.written = run_folder.write_recommendations(log_dir, records)
        print(f"wrote {len(by_index)} recommendation lists to {self.written}")

    def records(self, dm, by_index: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The output lines (see the module docstring) of the data module's predict dataset."""
        titles, encoder = dm.titles, dm.encoder
        if dm.predict_file:
            ds: HistoryDataset = dm.datasets["predict"]
            top = {i: self._top(recs, ds.histories[i].items, titles) for i, recs in by_index.items()}
            longest = longest_answer(encoder)
            out = [
                {
                    "line": h.line,
                    "user": h.user,
                    "history": [titles[i] for i in h.items],
                    "history_used": len(encoder.keep(h.items, longest)),
                    "recommendations": top[i],
                }
                for i, h in enumerate(ds.histories)
            ]
            out += [{"line": e.line, "user": e.user, "error": e.message} for e in dm.predict_errors]
            return sorted(out, key=lambda r: r["line"])
        samples = dm.datasets[dm.predict_split].samples
        top = {i: self._top(recs, samples.history(i), titles) for i, recs in by_index.items()}
        out = []
        for row in sorted(top):
            history, target = samples.history(row), int(samples.target[row])
            out.append(
                {
                    "sample_index": row,
                    "user": int(samples.user_id[row]),
                    "history": [titles[i] for i in history],
                    "history_used": len(encoder.keep(history, target)),
                    "target": {"item_id": target, "title": titles[target]},
                    "recommendations": top[row],
                }
            )
        return out

    def _top(self, recs: list[dict[str, Any]], history, titles) -> list[dict[str, Any]]:
        """The first `top_k` of `recs`, without the history's titles when `exclude_history`."""
        if self.exclude_history:
            seen = {titles[i] for i in history}
            recs = [r for r in recs if r["title"] not in seen]
        return recs[: self.top_k]
