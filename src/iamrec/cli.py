"""`iamrec fit | validate | test | predict --config FILE [--key.path=value ...]` (LightningCLI), and
`iamrec export --ckpt_path FILE --out DIR` (a merged Hugging Face folder, `iamrec.model.export`).

The backbone is named once (`model.backbone`) and linked to the tokenizer of the data module.

Checkpoints: `fit` writes ``<trainer.default_root_dir>/checkpoints/last.ckpt`` every
``checkpoint.every_n_train_steps`` optimizer steps (default `CHECKPOINT_EVERY`; 0: only at the end) and
when training ends, atomically (`iamrec.run_folder.RunCheckpoint`), and ``best.ckpt`` beside it after each
validation that lowers ``val/loss`` (``best_checkpoint.*``; ``--ckpt_path best`` names it). ``--ckpt_path last`` resumes it
exactly: the same remaining batches (`IAMDataModule.state_dict`) and dropout masks
(`IAMRecModule.on_train_batch_start`) as an uninterrupted run. Without a checkpoint ``--ckpt_path last``
makes `fit` start from step 0 (a notice says so) and stops `test`/`validate` (exit 2, nothing written).

Optimizer: AdamW and the schedule of ``model.scheduler`` / ``model.warmup_steps``
(`IAMRecModule.configure_optimizers`); LightningCLI's ``--optimizer`` / ``--lr_scheduler`` are refused
(one sentence, exit 2) rather than silently replacing them or being silently replaced. ``trainer.strategy:
fsdp`` shards each decoder layer (`iamrec.strategy`).

Errors. Expected failures are printed as one sentence, ``iamrec: error: ...``, exit status 2, no traceback:
the command line and config files (jsonargparse's errors; a YAML syntax error names its file), iamrec's
own errors (`DataFileError`, `ScheduleError`, `BackboneError`, `CheckpointError`, ... and every
ValueError raised by iamrec's, Lightning's or jsonargparse's own checks), Lightning's configuration
errors, a missing or unreadable checkpoint, and the disk refusing a file (not found, permission, full,
read-only: ENOSPC, EROFS, EACCES, ...). Everything else keeps its traceback: CUDA out of memory, NCCL and
other distributed errors, other RuntimeErrors, a ValueError raised inside torch/transformers, bugs. Set
IAMREC_DEBUG=1 to see the traceback of an expected error too.

`predict` writes ``recommendations.jsonl`` (`iamrec.predict`) over ``data.predict_split`` or the histories
of ``data.predict_file``. Its exit status: 0 when every history got recommendations; 1 when some lines of
the histories file named unknown items or were malformed (each is printed as ``iamrec: FILE line N:
sentence`` and written as an ``error`` line; the other lines got their recommendations); 2 for an
expected error as above (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from iamrec import run_folder
from iamrec.attention import ItemAttentionConfig
from iamrec.baselines.popular import evaluate_popular
from iamrec.data import IAMDataModule
from iamrec.errors import guarded, one_line
from iamrec.lit_module import IAMRecModule
from iamrec.model.export import export_model
from iamrec.model.loading import load_tokenizer
from iamrec.predict import RecommendationWriter
from iamrec.recommend import load_trained
from iamrec.run_folder import CheckpointError
from iamrec.strategy import fsdp_strategy

# Knobs that change only how a trained model is evaluated: with `--ckpt_path FILE` the command line (or
# config) wins over the checkpoint's saved hyper-parameters, which Lightning otherwise applies on top.
EVALUATION_KNOBS = ("num_beams", "ks", "val_generate")
# Default of `checkpoint.every_n_train_steps`: how often `fit` refreshes last.ckpt (optimizer steps).
CHECKPOINT_EVERY = 50
_RESUME_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


class ConfigFileError(ValueError):
    """A ``--config`` file that is not YAML settings (the message names the file)."""


class OptionError(ValueError):
    """An option or config key this command does not take (the message names it and what to set instead)."""


class RunFolderCLI(LightningCLI):
    """LightningCLI with iamrec's checkpoint rules (shared by `iamrec` and the SASRec baseline):
    ``--ckpt_path last`` resolved to the run folder's last.ckpt (or a clear stop), checkpoints checked
    before anything is built, `predict` refused when the model has no `predict_step`."""

    program = "iamrec"
    evaluation_knobs: tuple[str, ...] = ()
    # The model configures its own optimizer and schedule: LightningCLI's --optimizer / --lr_scheduler
    # are refused (`check_optimizer_options`) instead of silently replacing them.
    own_optimizer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_configure_optimizers", not self.own_optimizer)
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        if (
            sub == "predict"
            and getattr(self._model_class, "predict_step", None) is LightningModule.predict_step
        ):
            raise ValueError(
                f"{self.program} predict is not implemented yet; use test (it writes predictions.parquet)."
            )
        config = self.config[sub]
        dirpath = config.get("checkpoint.dirpath")
        given = config.get("ckpt_path")
        path = run_folder.resolve_ckpt_path(sub, given, dirpath)
        config["ckpt_path"] = path
        last = Path(dirpath or run_folder.CHECKPOINTS) / run_folder.LAST_CHECKPOINT
        if sub == "fit" and path is None:
            if given == "last":
                self.notice(f"--ckpt_path last: no checkpoint at {last} yet; this fit starts from step 0.")
            elif last.is_file():
                self.notice(
                    f"note: {last} exists and this fit starts from step 0; it replaces that checkpoint at its "
                    "first save (--ckpt_path last resumes it instead)."
                )
        if path is None or path in ("best", "hpc") or not Path(path).is_file():
            return  # nothing, a special value Lightning resolves, or a (sharded) checkpoint folder
        ckpt = run_folder.load_checkpoint_header(path, resume=sub == "fit")
        self._apply_checkpoint_hparams(sub, path, ckpt)
        if sub == "fit":
            self.notice(f"resuming {path} at step {ckpt.get('global_step', '?')}.")
            if self._datamodule_class.load_state_dict is not LightningDataModule.load_state_dict:
                if not ckpt.get(self._datamodule_class.__qualname__, {}).get("train_order"):
                    self.notice(
                        f"note: {path} records no position in the training order (an older checkpoint); "
                        "the resumed run restarts its epoch's batches from the beginning."
                    )
                warnings.filterwarnings("ignore", message=_RESUME_WARNING)  # the datamodule resumes its order

    def notice(self, text: str) -> None:
        """A line on stderr, from the first process only (DDP re-runs the command in every process)."""
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            print(f"{self.program}: {text}", file=sys.stderr)

    def _apply_checkpoint_hparams(self, sub: str, path: str, ckpt: dict[str, Any]) -> None:
        """Lightning's rule (the checkpoint's hyper-parameters over the config), except the evaluation
        knobs; say what the checkpoint overrode."""
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        before = self.config[sub]["model"].clone()
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except (ArgumentError, SystemExit) as err:
            raise CheckpointError(
                f"{path} was not saved by this model: its hyper-parameters do not fit it ({one_line(err)})."
            ) from None
        model = self.config[sub]["model"]
        for key in self.evaluation_knobs:
            model[key] = before[key]
        for key, value in vars(model).items():
            if key in before and before[key] != value:
                self.notice(
                    f"model.{key} = {value!r} from the checkpoint (the config said {before[key]!r}); "
                    "the checkpoint's weights were trained with it."
                )


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
        # <root>/checkpoints/last.ckpt every checkpoint.every_n_train_steps and at the end: `--ckpt_path last`
        run_folder.add_run_checkpoint(parser, save_top_k=0, every_n_train_steps=CHECKPOINT_EVERY)
        # `predict` writes recommendations.jsonl: --recommend.top_k (idle in the other subcommands)
        parser.add_lightning_class_args(RecommendationWriter, "recommend")
        # <root>/checkpoints/best.ckpt: the weights at the lowest val/loss so far (`--ckpt_path best`)
        run_folder.add_best_checkpoint(parser, monitor="val/loss", mode="min")

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


def _config_paths(args: Sequence[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith(("--config=", "-c=")):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(args: Sequence[str]) -> None:
    """Every ``--config`` file must be YAML holding a mapping; else a `ConfigFileError` naming that file
    (jsonargparse's own message names neither file nor line)."""
    for path in _config_paths(args):
        if not Path(path).is_file():
            continue  # jsonargparse names a missing file itself (and --config also takes inline YAML)
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or one_line(err)
            raise ConfigFileError(f"{path} is not valid YAML: {problem}{where}.") from None
        except UnicodeDecodeError:
            raise ConfigFileError(f"{path} is not a text (YAML) file.") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigFileError(
                f"{path} holds no settings: a config file is a YAML mapping (trainer:, model:, data: ...), "
                f"this one holds a {type(data).__name__}."
            )


OPTIMIZER_OPTIONS = ("optimizer", "lr_scheduler")


def check_optimizer_options(args: Sequence[str]) -> None:
    """Refuse LightningCLI's ``--optimizer`` / ``--lr_scheduler`` (command line or a ``--config`` file) with
    one sentence: the model's optimizer and schedule are set by its own keys, never replaced silently."""
    keys = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    given = [k for k in keys if k[2:].split(".")[0] in OPTIMIZER_OPTIONS]
    for path in _config_paths(args):
        if Path(path).is_file():
            data = yaml.safe_load(Path(path).read_text())
            given += [f"{k}: in {path}" for k in OPTIMIZER_OPTIONS if isinstance(data, dict) and k in data]
    if given:
        raise OptionError(
            f"{given[0]} is not supported: iamrec trains with AdamW and its own schedule; set model.lr, "
            "model.weight_decay, model.warmup_steps and model.scheduler (cosine, linear or constant) instead."
        )


def run_cli(
    cli_class: type[RunFolderCLI], model_class: type, datamodule_class: type, args: list[str] | None
) -> None:
    """Run `cli_class`; an expected failure becomes one sentence on stderr and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    no_exit = {"exit_on_error": False}
    parser_kwargs = {**no_exit, **{sub: no_exit for sub in cli_class.subcommands()}}

    def run() -> None:
        argv = sys.argv[1:] if args is None else args
        check_config_files(argv)
        if cli_class.own_optimizer:
            check_optimizer_options(argv)
        cli_class(
            model_class,
            datamodule_class,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            args=args,
        )

    guarded(run, cli_class.program)


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
        keep = ("data_dir", "tokenizer", "template", "max_items", "max_length", "eval_batch_size")
        settings = {
            "backbone": hp.backbone,
            "num_beams": hp.num_beams,
            "lora": hp.lora,
            "data": {k: data[k] for k in keep if k in data},
        }
        tokenizer = load_tokenizer(data.get("tokenizer") or hp.backbone)
        config = ItemAttentionConfig(**attention)
        out = export_model(module.model, tokenizer, config, ns.out, settings)
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
