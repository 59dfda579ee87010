"""The run-folder layout shared by every iamrec command line (`iamrec`, `python -m iamrec.baselines.sasrec`).

``<trainer.default_root_dir>/checkpoints/last.ckpt`` is written by every fit, so ``--ckpt_path last`` works
from a new process: resuming after an interruption, or ``test`` after ``fit``.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


def checkpoint_dir(root: str | None) -> str:
    return os.path.join(root or ".", "checkpoints")


def add_run_checkpoint(parser, **defaults: Any) -> None:
    """Add a ``checkpoint`` ModelCheckpoint group saving ``last.ckpt`` under ``<default_root_dir>/checkpoints``."""
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults({"checkpoint.save_last": True, **{f"checkpoint.{k}": v for k, v in defaults.items()}})
    parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
