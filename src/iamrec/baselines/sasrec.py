"""``python -m iamrec.baselines.sasrec fit | validate | test``: SASRec (Kang & McAuley, ICDM 2018) with
full-catalogue cross-entropy, behind iamrec's data, metrics and run folder.

sasrec_data.py    SASRecDataModule: samples.parquet as left-padded history batches (pad id = I)
sasrec_model.py   SASRec: the network and its LightningModule (training objective, full-catalogue ranking)
sasrec.py         SASRecCLI: iamrec's run-folder CLI (`iamrec.cli_base`) writing the test outputs

The names of the parts stay importable from here (``from iamrec.baselines.sasrec import SASRec``).
"""

from __future__ import annotations

from pathlib import Path

from iamrec.baselines.sasrec_data import PaddedSamples, SASRecDataModule, left_pad
from iamrec.baselines.sasrec_model import CausalSelfAttention, SASRec, SASRecBlock
from iamrec.cli_base import RunFolderCLI, run_cli
from iamrec.metrics import gather_samples
from iamrec.run_checkpoints import add_run_checkpoint
from iamrec.run_folder import PREDICTION_COLUMNS, write_test_outputs

__all__ = [
    "CausalSelfAttention",
    "PaddedSamples",
    "SASRec",
    "SASRecBlock",
    "SASRecCLI",
    "SASRecDataModule",
    "left_pad",
    "main",
]


class SASRecCLI(RunFolderCLI):
    """``python -m iamrec.baselines.sasrec``: SASRec + SASRecDataModule, with iamrec's run-folder layout and
    checkpoint rules (``--ckpt_path last``, checked checkpoints; see `iamrec.cli_base`)."""

    program = "iamrec.baselines.sasrec"

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.max_len", "model.max_len")
        # As in `iamrec`: <default_root_dir>/checkpoints/last.ckpt (resume, test from a new process), plus
        # the best epoch by validation NDCG@10 as best-*.ckpt (what the table evaluates).
        add_run_checkpoint(parser, save_top_k=1, monitor="val/NDCG@10", mode="max", filename="best-{epoch}")

    def after_test(self) -> None:
        """Write ``test_metrics.json`` and ``predictions.parquet`` (all processes' rows) to the log dir."""
        model: SASRec = self.model
        # one row per sample of this process (top_items: its list of K items), then every process's
        rows = [
            dict(zip(PREDICTION_COLUMNS, values))
            for part in model.test_predictions
            for values in zip(*(part[k].tolist() for k in PREDICTION_COLUMNS))
        ]
        frame = gather_samples(rows, PREDICTION_COLUMNS)
        log_dir = Path(self.trainer.log_dir or ".")
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) if k != "users" else int(v) for k, v in model.test_results.items()}
        metrics["invalid_rate"] = 0.0  # a ranking over the catalogue never names a non-item
        write_test_outputs(log_dir, metrics, frame, method="sasrec")


def main(args: list[str] | None = None) -> None:
    """Expected failures: one sentence and exit status 2; anything else keeps its traceback (`iamrec.errors`)."""
    run_cli(SASRecCLI, SASRec, SASRecDataModule, args)


if __name__ == "__main__":
    main()
