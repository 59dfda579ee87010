"""`iamrec fit | validate | test | predict --config FILE [--key.path=value ...]` (LightningCLI), and
`iamrec export --ckpt_path FILE --out DIR [--replace]` (a merged Hugging Face folder, written atomically,
`iamrec.model.export`).

The backbone is named once (`model.backbone`) and linked to the tokenizer of the data module.

Checkpoints: `fit` writes ``<trainer.default_root_dir>/checkpoints/last.ckpt`` every
``checkpoint.every_n_train_steps`` optimizer steps (default `CHECKPOINT_EVERY`; 0: only at the end) and
when training ends, atomically (`iamrec.run_checkpoints.RunCheckpoint`), and ``best.ckpt`` beside it after
each validation that lowers ``val/loss`` (``best_checkpoint.*``; ``--ckpt_path best`` names it; a fit
without validation writes none, and ``--ckpt_path best`` then stops with one sentence saying so).
``--ckpt_path last`` resumes it exactly: the same remaining batches (`IAMDataModule.state_dict`) and
dropout masks (`IAMRecModule.on_train_batch_start`) as an uninterrupted run. Without a checkpoint
``--ckpt_path last`` makes `fit` start from step 0 (a notice says so) and stops `test`/`validate` (exit 2,
nothing written).

A checkpoint knows its data: it records the fingerprint of the catalogue it was trained on
(`iamrec.data.fingerprint`), and every command given a checkpoint file refuses a ``data.data_dir`` with
another catalogue (one sentence naming both folders, exit 2, nothing written) unless
``--allow_other_catalogue true``; a checkpoint saved before fingerprints gets a notice.

Optimizer: AdamW and the schedule of ``model.scheduler`` / ``model.warmup_steps``
(`IAMRecModule.configure_optimizers`); LightningCLI's ``--optimizer`` / ``--lr_scheduler`` are refused
(one sentence, exit 2) rather than silently replacing them or being silently replaced. ``trainer.strategy:
fsdp`` shards each decoder layer (`iamrec.strategy`). Under Slurm (``slurm/iamrec.sbatch``) the time-limit
signal saves ``last.ckpt`` at the end of the step and requeues the job (``--requeue.*``, `iamrec.slurm`).

Errors: every command runs under the one error policy, written in `iamrec.errors` (which failures are one
sentence with exit status 2, which keep their traceback). The LightningCLI base (`RunFolderCLI`) and the
checks made before parsing are `iamrec.cli_base`'s.

`predict` writes ``recommendations.jsonl`` (`iamrec.predict`) over ``data.predict_split`` or the histories
of ``data.predict_file``. Its exit status: 0 when every history got recommendations; 1 when some lines of
the histories file named unknown items or were malformed (each is printed as ``iamrec: FILE line N:
sentence`` and written as an ``error`` line; the other lines got their recommendations); 2 for an
expected error (`iamrec.errors`; nothing written).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from iamrec import run_folder
from iamrec.attention import ItemAttentionConfig
from iamrec.baselines.popular import evaluate_popular
from iamrec.cli_base import (
    ConfigFileError,
    OptionError,
    RunFolderCLI,
    check_config_files,
    check_optimizer_options,
    run_cli,
)
from iamrec.data import IAMDataModule
from iamrec.data.fingerprint import CATALOGUE_KEY, check_catalogue
from iamrec.errors import guarded
from iamrec.lit_module import IAMRecModule
from iamrec.model.export import export_model
from iamrec.model.loading import load_tokenizer
from iamrec.predict import RecommendationWriter
from iamrec.recommend import load_trained, recorded_data
from iamrec.run_checkpoints import add_best_checkpoint, add_run_checkpoint
from iamrec.slurm import SlurmRequeue
from iamrec.strategy import fsdp_strategy
from iamrec.timing import StageTimer

# The LightningCLI base and the checks before parsing live in `iamrec.cli_base` (the SASRec baseline
# shares them); they stay importable from here.
__all__ = [
    "CHECKPOINT_EVERY",
    "EVALUATION_KNOBS",
    "ConfigFileError",
    "IAMRecCLI",
    "OptionError",
    "RunFolderCLI",
    "check_config_files",
    "check_optimizer_options",
    "export",
    "main",
    "run_cli",
]

# Knobs that change only how a trained model is evaluated: with `--ckpt_path FILE` the command line (or
# config) wins over the checkpoint's saved hyper-parameters, which Lightning otherwise applies on top.
EVALUATION_KNOBS = ("num_beams", "ks", "val_generate")
# Default of `checkpoint.every_n_train_steps`: how often `fit` refreshes last.ckpt (optimizer steps).
CHECKPOINT_EVERY = 50


class IAMRecCLI(RunFolderCLI):
    program = "iamrec"
    evaluation_knobs = EVALUATION_KNOBS
    own_optimizer = True

    def instantiate_trainer(self, **kwargs: Any):
        """``trainer.strategy: fsdp`` becomes FSDP with one unit per decoder layer (`iamrec.strategy`)."""
        if self._get(self.config_init, "trainer", default={}).get("strategy") == "fsdp":
            kwargs.setdefault("strategy", fsdp_strategy(self.model.hparams.backbone))
        return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.backbone", "data.tokenizer")
        parser.add_argument(
            "--allow_other_catalogue",
            type=bool,
            default=False,
            help="Use a checkpoint with a data.data_dir whose catalogue (items.parquet) is not the one it was "
            "trained on; refused by default (its item ids would name other items).",
        )
        # <root>/checkpoints/last.ckpt every checkpoint.every_n_train_steps and at the end: `--ckpt_path last`
        add_run_checkpoint(parser, save_top_k=0, every_n_train_steps=CHECKPOINT_EVERY)
        # `predict` writes recommendations.jsonl: --recommend.top_k (idle in the other subcommands)
        parser.add_lightning_class_args(RecommendationWriter, "recommend")
        # <root>/timing.json: steps/s of fit and samples/s of test, read by the table scheduler
        parser.add_lightning_class_args(StageTimer, "timing")
        # <root>/checkpoints/best.ckpt: the weights at the lowest val/loss so far (`--ckpt_path best`)
        add_best_checkpoint(parser, monitor="val/loss", mode="min")
        # Under Slurm: SIGUSR1 saves last.ckpt at the end of the step, requeues the job, stops (`iamrec.slurm`)
        parser.add_lightning_class_args(SlurmRequeue, "requeue")

    def check_checkpoint_data(self, sub: str, path: str, ckpt: dict[str, Any]) -> None:
        """Refuse a checkpoint trained on another catalogue than ``data.data_dir``'s (one sentence naming
        both folders) unless ``--allow_other_catalogue true``; a checkpoint without a fingerprint gets a
        notice (`iamrec.data.fingerprint`)."""
        config = self.config[sub]
        data_dir = config.get("data.data_dir")
        if data_dir is None:
            return
        allow = bool(config.get("allow_other_catalogue"))
        said = check_catalogue(ckpt.get(CATALOGUE_KEY), data_dir, path, allow, "--allow_other_catalogue true")
        if said:
            self.notice(said)

    def after_predict(self) -> None:
        """Report the histories-file lines that got no recommendations; exit status 1 if any."""
        errors = getattr(self.datamodule, "predict_errors", [])
        if not errors or not self.trainer.is_global_zero:
            return
        for e in errors:
            print(
                f"{self.program}: {self.datamodule.predict_file} line {e.line}: {e.message}", file=sys.stderr
            )
        total = len(errors) + len(self.datamodule.datasets["predict"])
        print(
            f"{self.program}: {len(errors)} of {total} histories got no recommendations (their lines in "
            "recommendations.jsonl hold the error); the others did. Exit status 1.",
            file=sys.stderr,
        )
        raise SystemExit(1)

    def after_test(self) -> None:
        """Print the most-popular baseline on the same test samples beside the model."""
        dm = self.datamodule
        if not self.trainer.is_global_zero or not isinstance(dm, IAMDataModule):
            return
        ds = dm.datasets.get("test")
        indices = getattr(ds, "rows", None)  # the exact samples the model was tested on
        popular = evaluate_popular(dm.data_dir, split="test", ks=self.model.ks, sample_indices=indices)
        print(run_folder.format_metrics_table({"most-popular": popular}, self.model.ks))


def export(args: list[str]) -> None:
    """`iamrec export --ckpt_path FILE --out DIR`: the checkpoint's model as a merged Hugging Face folder
    (`iamrec.model.export`), loaded back by `iamrec.model.load_exported` / `Recommender.from_exported`."""
    parser = argparse.ArgumentParser(
        prog="iamrec export",
        description="Write a trained model as a Hugging Face folder: LoRA merged, tokenizer, item_attention.json.",
    )
    parser.add_argument("--ckpt_path", required=True, help="last.ckpt of an iamrec fit, or its run folder")
    parser.add_argument("--out", required=True, help="a new (or empty) folder")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace an earlier export in --out (atomically: a failed export leaves it intact)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed_everything of the run; matters only for LoRA on `tiny` backbones",
    )
    ns = parser.parse_args(args)

    def run() -> Path:
        module, data = load_trained(ns.ckpt_path, seed=ns.seed)
        hp = module.hparams
        attention = dict(hp.attention)
        if isinstance(attention.get("hatllm_bands"), list):
            attention["hatllm_bands"] = tuple(attention["hatllm_bands"])
        settings = {
            "backbone": hp.backbone,
            "num_beams": hp.num_beams,
            "lora": hp.lora,
            "data": recorded_data(data),
            "catalogue": data.get("catalogue"),  # the fingerprint of the catalogue it was trained on
        }
        tokenizer = load_tokenizer(data.get("tokenizer") or hp.backbone)
        config = ItemAttentionConfig(**attention)
        out = export_model(module.model, tokenizer, config, ns.out, settings, replace=ns.replace)
        print(f"exported {ns.ckpt_path} to {out} (item attention: {asdict(config)})")
        return out

    guarded(run)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        export(argv[1:])
        return
    run_cli(IAMRecCLI, IAMRecModule, IAMDataModule, args)


if __name__ == "__main__":
    main()
