"""A run's checkpoints: what ``--ckpt_path`` means (`resolve_ckpt_path`), a checkpoint checked before
anything is built (`load_checkpoint_header`), and the callbacks that write them atomically under
``<default_root_dir>/checkpoints`` (`RunCheckpoint`: ``last.ckpt``; `BestCheckpoint`: ``best.ckpt``;
`add_run_checkpoint` / `add_best_checkpoint` put them on a LightningCLI parser). The names and places are
`iamrec.run_folder`'s; this module adds what needs torch and Lightning.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint

from iamrec.errors import CheckpointWriteError
from iamrec.run_folder import (
    BEST_CHECKPOINT,
    CHECKPOINTS,
    LAST_CHECKPOINT,
    CheckpointError,
    atomic_open,
    checkpoint_dir,
)

# ------------------------------------------------------------------------------------ finding, checking


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def resolve_ckpt_path(subcommand: str, ckpt_path: str | None, dirpath: str | None) -> str | None:
    """`--ckpt_path` as the command will use it. ``last`` becomes ``<dirpath>/last.ckpt``; when there is
    none, `fit` gets None (it starts from step 0; the caller says so) and the other commands a
    `CheckpointError` (rather than evaluating an untrained model). ``best`` becomes
    ``<dirpath>/best.ckpt``; without one it is a `CheckpointError` saying how to get one (Lightning would
    look for the best checkpoint of this process's own fit and say something misleading). A path that
    does not exist is a `CheckpointError`."""
    if ckpt_path == "best":
        best = Path(dirpath or CHECKPOINTS) / BEST_CHECKPOINT
        if best.is_file():
            return str(best)
        raise CheckpointError(
            f"{subcommand} --ckpt_path best: there is no checkpoint {best} (a fit writes it after each "
            "validation that improves its monitored metric, so only a fit with validation has one: "
            "trainer.limit_val_batches > 0 and best_checkpoint.save_top_k >= 1); run such a fit, or pass "
            "--ckpt_path last or a checkpoint file."
        )
    if ckpt_path is None or ckpt_path == "hpc":
        return ckpt_path
    if ckpt_path != "last":
        if not Path(ckpt_path).exists():
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no such checkpoint file.")
        return str(ckpt_path)
    last = Path(dirpath or CHECKPOINTS) / LAST_CHECKPOINT
    if last.is_file():
        return str(last)
    if subcommand == "fit":
        return None
    raise CheckpointError(
        f"{subcommand} --ckpt_path last: there is no checkpoint {last} (no fit has saved one in that run folder); "
        "run fit first, or pass the checkpoint file as --ckpt_path."
    )


def load_checkpoint_header(path: str | Path, resume: bool) -> dict[str, Any]:
    """The checkpoint at `path` (tensors memory-mapped, not read), after checking it is a Lightning
    checkpoint, and one `fit` can resume when `resume`; else a `CheckpointError` naming the file."""

    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # every checkpoint torch.save writes is a zip archive
        raise CheckpointError(f"{path} is not a checkpoint (not a file torch.save wrote).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        reason = _first_line(err)[:160]
        raise CheckpointError(f"{path} is a truncated or corrupt checkpoint ({reason}).") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds no state_dict).")
    if resume and not {"optimizer_states", "loops"} <= set(ckpt):
        raise CheckpointError(
            f"{path} holds weights only (no optimizer or loop state); fit cannot resume it (test and validate can)."
        )
    return ckpt


# ------------------------------------------------------------------------------------------- writing


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but a local checkpoint is written to a temporary file in its own
    folder, fsynced and renamed onto its name: a killed run or a full disk never leaves a truncated
    file under the final name (Lightning's own write goes through a temporary file in /tmp that is
    then *copied* over the target when /tmp is another filesystem)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:
            # torch.save turns a failed write into a RuntimeError raised on top of the OSError
            cause = _os_error_in(err)
            if cause is None:
                raise
            kept = "the previous checkpoint there is intact" if path.is_file() else "no checkpoint was saved"
            raise CheckpointWriteError(
                cause.errno,
                f"could not write the checkpoint {path} ({cause.strerror or cause}); {kept}",
                str(path),
            ) from err


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes atomically (`AtomicCheckpointIO`) and always keeps ``last.ckpt``
    current: at every trigger (``every_n_train_steps``, or the epoch trigger), whether or not a top-k
    checkpoint was saved there, and when training ends (the final step, whatever the interval;
    Lightning 2.6 saves it there only when nothing was saved before)."""

    @property
    def state_key(self) -> str:  # the key plain ModelCheckpoint used, so older checkpoints restore
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _save_last_now(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _epoch_trigger(self, trainer) -> bool:
        every = self._every_n_epochs
        return every >= 1 and (trainer.current_epoch + 1) % every == 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer) and self._epoch_trigger(trainer):
            self._save_last_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and self._epoch_trigger(trainer):
            self._save_last_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last_now(trainer)


class BestCheckpoint(RunCheckpoint):
    """``best.ckpt``: the checkpoint at the best value of ``monitor`` so far, written atomically right
    after each validation that improves it (never at a later step, whose weights were not measured)."""


def _os_error_in(err: BaseException | None) -> OSError | None:
    """The first OSError in `err`'s chain (itself, its cause or context), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def add_run_checkpoint(parser, **defaults: Any) -> None:
    """Add a ``checkpoint`` group (a `RunCheckpoint`) saving ``last.ckpt`` under ``<default_root_dir>/checkpoints``
    (always that name: no ``last-v1.ckpt``)."""
    parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
    parser.set_defaults(
        {
            "checkpoint.save_last": True,
            "checkpoint.enable_version_counter": False,
            **{f"checkpoint.{k}": v for k, v in defaults.items()},
        }
    )
    parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)


def add_best_checkpoint(parser, monitor: str = "val/loss", mode: str = "min") -> None:
    """Add a ``best_checkpoint`` group (a `BestCheckpoint`) keeping ``best.ckpt`` beside ``last.ckpt``: the
    weights at the best `monitor` value so far, saved right after the validation that measured it
    (``--best_checkpoint.save_top_k=0`` turns it off)."""
    parser.add_lightning_class_args(BestCheckpoint, "best_checkpoint")
    parser.set_defaults(
        {
            "best_checkpoint.monitor": monitor,
            "best_checkpoint.mode": mode,
            "best_checkpoint.save_top_k": 1,
            "best_checkpoint.filename": Path(BEST_CHECKPOINT).stem,
            "best_checkpoint.auto_insert_metric_name": False,
            "best_checkpoint.save_last": False,
            "best_checkpoint.save_on_train_epoch_end": False,
            "best_checkpoint.enable_version_counter": False,
        }
    )
    parser.link_arguments("trainer.default_root_dir", "best_checkpoint.dirpath", compute_fn=checkpoint_dir)
