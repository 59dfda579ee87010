"""The LightningCLI under every iamrec command that trains or tests (`iamrec` and
``python -m iamrec.baselines.sasrec``): `RunFolderCLI` with the run folder's checkpoint rules, the checks
of ``--config`` files and of ``--optimizer`` / ``--lr_scheduler`` made before jsonargparse parses, and
`run_cli`, which runs a command under the error policy of `iamrec.errors`.

Checkpoint rules (`RunFolderCLI`): ``--ckpt_path last`` is ``<checkpoint.dirpath>/last.ckpt``
(`iamrec.run_checkpoints.resolve_ckpt_path`): without one, `fit` starts from step 0 (a notice says so) and
`test` / `validate` stop (exit 2, nothing written); a checkpoint is checked before anything is built
(`iamrec.run_checkpoints.load_checkpoint_header`), and its hyper-parameters override the config except the
subclass's `evaluation_knobs`; `predict` is refused when the model has no `predict_step`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from iamrec import run_folder
from iamrec.errors import guarded, one_line
from iamrec.run_checkpoints import load_checkpoint_header, resolve_ckpt_path
from iamrec.run_folder import CheckpointError

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
        path = resolve_ckpt_path(sub, given, dirpath)
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
        if path is None or path == "hpc" or not Path(path).is_file():
            return  # nothing, the value Lightning resolves, or a (sharded) checkpoint folder
        ckpt = load_checkpoint_header(path, resume=sub == "fit")
        self.check_checkpoint_data(sub, path, ckpt)
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

    def check_checkpoint_data(self, sub: str, path: str, ckpt: dict[str, Any]) -> None:
        """Check the checkpoint against the data the command was given, before anything is built (a
        subclass's rule; none here)."""

    def notice(self, text: str) -> None:
        """A line on stderr, from the first process only (DDP re-runs the command in every process)."""
        ranks = ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # Lightning's launcher, or srun's tasks
        if all(os.environ.get(name, "0") == "0" for name in ranks):
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
