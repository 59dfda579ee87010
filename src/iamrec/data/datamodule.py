"""`IAMDataModule`: a processed dataset folder -> prompt batches for training and evaluation.

The catalogue side (`items`, `titles`, `tokenizer`, `encoder`, `answer_token_ids`) loads lazily on first
use, so the LightningModule can build its decoding trie before `setup` runs; samples load in `setup`.

Resuming: the training order is a function of ``(data.seed, epoch)`` (`iamrec.data.sampler`). Every
checkpoint holds this module's `state_dict`: the position in that order (epoch, batches of it done, from
Lightning's own progress counters, which it checkpoints and restores with the loops) and what the order
depends on. `load_state_dict` (Lightning calls it before it asks for the train loader) makes the next
`train_dataloader` start exactly there, so a resumed run trains on the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from iamrec.data.collate import Collator
from iamrec.data.dataset import (
    SPLITS,
    SampleDataset,
    Samples,
    check_data_dir,
    eval_subset_rows,
    load_items,
    load_samples,
    subset_rows,
)
from iamrec.data.encoding import PromptEncoder, check_titles_sayable
from iamrec.data.fingerprint import catalogue_record
from iamrec.data.histories import (
    Catalogue,
    HistoryDataset,
    HistoryFileError,
    HistoryLineError,
    read_histories,
)
from iamrec.data.prompt import PromptTemplate
from iamrec.data.sampler import LengthGroupedBatchSampler, ResumableBatchSampler, SeededRandomSampler
from iamrec.model.loading import load_tokenizer


def _check_positive(name: str, value: int | None, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}.")


class IAMDataModule(L.LightningDataModule):
    """Prompts with segment ids from a processed dataset (`data/processed/<name>/`).

    Args:
        data_dir: Folder holding items.parquet and samples.parquet (made by `make data-ml100k` or a
            `python -m data_prep.<source>` run).
        tokenizer: Model spec of the tokenizer: ``tiny``, a local model folder, or a hub id; normally the
            same as the backbone.
        template: How histories and answers are written as text; the defaults are the paper-style
            prompt (see `iamrec.data.prompt`).
        max_items: Keep at most this many most recent history items (None: all).
        max_length: Longest sequence (prompt + answer + EOS) in tokens; whole oldest items are dropped
            until a sample fits.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and predict.
        num_workers: DataLoader worker processes.
        pin_memory: Collate batches into page-locked memory, so the copy to the GPU does not block the
            host (None: on when CUDA is available; it does nothing without a GPU).
        persistent_workers: Keep the ``num_workers`` worker processes alive between epochs and between
            validation runs instead of starting them again each time (only with ``num_workers > 0``).
        padding_side: Where training (and validation-loss) sequences are padded; evaluation prompts are
            always left-padded.
        pad_to_multiple_of: Round padded lengths up to a multiple of this (e.g. 64 on GPU: a few
            static shapes for ``model.compile`` and the kernels; 128 for FlexAttention); None pads to the
            longest in the batch.
        bucket_by_length: Group training samples of similar length into batches (less padding; still
            shuffled and seeded; works under DDP).
        max_train_samples: Train on a seeded random subset of this many training samples (None: all).
        max_eval_samples: Evaluate on a fixed seeded subset of this many valid/test samples, the same
            across runs and ranks and the same rows SASRec and most-popular score (`eval_subset_rows`;
            None: all).
        predict_split: Which split `predict` runs on (unless `predict_file` is given).
        predict_file: A JSONL file of histories for `predict` instead of a split: one
            ``{"history": [...], "user": ...}`` object per line, items as titles or item ids (see
            `iamrec.data.histories`). Lines naming unknown items are reported and skipped.
        seed: Seeds the training shuffle, the bucketing and the subsets.
    """

    def __init__(
        self,
        data_dir: str,
        tokenizer: str,
        template: PromptTemplate | None = None,
        max_items: int | None = 10,
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
        bucket_by_length: bool = False,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        predict_split: Literal["valid", "test"] = "test",
        seed: int = 0,
        predict_file: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive("max_items", max_items, allow_none=True, minimum=0)
        _check_positive("max_length", max_length)
        _check_positive("batch_size", batch_size)
        _check_positive("eval_batch_size", eval_batch_size)
        _check_positive("num_workers", num_workers, minimum=0)
        _check_positive("pad_to_multiple_of", pad_to_multiple_of, allow_none=True)
        _check_positive("max_train_samples", max_train_samples, allow_none=True)
        _check_positive("max_eval_samples", max_eval_samples, allow_none=True)
        if padding_side not in ("left", "right"):
            raise ValueError(f"data.padding_side must be 'left' or 'right', got {padding_side!r}.")
        if predict_split not in ("valid", "test"):
            raise ValueError(f"data.predict_split must be 'valid' or 'test', got {predict_split!r}.")
        if template is not None and not isinstance(template, PromptTemplate):
            raise ValueError(f"data.template must be a PromptTemplate, got {type(template).__name__}.")
        self.data_dir = data_dir
        self.tokenizer_spec = tokenizer
        self.template = template if template is not None else PromptTemplate()
        self.max_items, self.max_length = max_items, max_length
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.padding_side, self.pad_to_multiple_of = padding_side, pad_to_multiple_of
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.bucket_by_length = bucket_by_length
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.predict_split, self.seed = predict_split, seed
        self.predict_file = predict_file
        # Saved in every checkpoint: `iamrec.recommend` rebuilds the exact training prompts from them.
        self.save_hyperparameters(ignore=("template",))
        self.hparams["template"] = asdict(self.template)
        self.predict_errors: list[HistoryLineError] = []  # the predict_file lines that got no prompt
        self.datasets: dict[str, SampleDataset] = {}
        self._samples: Samples | None = None
        self._resume: dict[str, Any] | None = None  # the train position of a loaded checkpoint
        self._titles_checked = False

    # --- catalogue (lazy) ----------------------------------------------------------------------------
    @cached_property
    def items(self) -> pd.DataFrame:
        """items.parquet, sorted by item_id, titles stripped."""
        return load_items(self.data_dir)

    @property
    def titles(self) -> list[str]:
        """Item titles indexed by item id."""
        return self.items["title"].tolist()

    @property
    def num_items(self) -> int:
        return len(self.items)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_spec)

    @cached_property
    def encoder(self) -> PromptEncoder:
        """The catalogue tokenized once (see `iamrec.data.encoding`)."""
        return PromptEncoder(self.tokenizer, self.template, self.titles, self.max_items, self.max_length)

    @cached_property
    def catalogue(self) -> dict[str, str] | None:
        """The catalogue's fingerprint and folder (`iamrec.data.fingerprint.catalogue_record`), taken at
        `setup`; the LightningModule records it in every checkpoint."""
        return catalogue_record(self.data_dir)

    @property
    def answer_token_ids(self) -> list[list[int]]:
        """Per item id: the answer tokens + EOS, exactly as trained (`PromptEncoder.answer_ids`, built by `encode_answers`); for the trie."""
        return self.encoder.answer_ids

    # --- samples -------------------------------------------------------------------------------------
    @property
    def samples(self) -> Samples:
        if self._samples is None:
            self._samples = load_samples(self.data_dir, self.num_items)
        return self._samples

    def _dataset(self, split: str) -> SampleDataset:
        if split not in self.datasets:
            if split == "train":
                rows = subset_rows(self.samples.rows(split), self.max_train_samples, self.seed)
            else:
                rows = eval_subset_rows(self.samples, split, self.max_eval_samples, self.seed)
            self.datasets[split] = SampleDataset(self.encoder, self.samples, rows)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Load and check the files and build the datasets `stage` needs (all splits when None). A title
        whose tokens include a special token of the tokenizer is refused here (`check_titles_sayable`)."""
        check_data_dir(self.data_dir)
        if not self._titles_checked:  # a title holding a special token could never be decoded
            check_titles_sayable(self.tokenizer, self.titles, str(Path(self.data_dir) / "items.parquet"))
            self._titles_checked = True
        _ = self.catalogue
        needs = {
            "fit": ("train", "valid"),
            "validate": ("valid",),
            "test": ("test",),
            "predict": () if self.predict_file else (self.predict_split,),
        }
        for split in needs.get(stage or "", SPLITS):
            self._dataset(split)

    # --- loaders -------------------------------------------------------------------------------------
    def _collator(self, with_prompt: bool) -> Collator:
        return Collator(self.tokenizer.pad_token_id, self.padding_side, self.pad_to_multiple_of, with_prompt)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        resume_at = self._resume_at(ds)
        sampler = SeededRandomSampler(ds, self.seed)
        if self.bucket_by_length:
            batch_sampler: ResumableBatchSampler = LengthGroupedBatchSampler(
                sampler, self.batch_size, False, ds.lengths, self.seed, resume_at=resume_at
            )
        else:
            batch_sampler = ResumableBatchSampler(
                sampler, self.batch_size, False, resume_at=resume_at, seed=self.seed
            )
        # Under DDP Lightning swaps `sampler` for a DistributedSampler, reseeded by the batch sampler
        # (see sampler.py: the same order on one and several devices). The loader's own
        # generator only seeds worker processes; it keeps the loader off torch's global RNG.
        return DataLoader(
            ds,
            batch_sampler=batch_sampler,
            collate_fn=self._collator(False),
            **self._loader_options(),
            generator=torch.Generator().manual_seed(self.seed),
        )

    # --- resuming ------------------------------------------------------------------------------------
    def _order_key(self, ds: SampleDataset) -> dict[str, Any]:
        """What the training order depends on besides the epoch (a checkpoint's order must match it)."""
        rows = np.asarray(ds.rows, dtype=np.int64)
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "bucket_by_length": self.bucket_by_length,
            "train_rows": f"{len(rows)}:{hashlib.sha1(rows.tobytes()).hexdigest()[:16]}",
            # each process reads its shard of every epoch: another count of processes reads other batches
            "processes": getattr(getattr(self, "trainer", None), "world_size", 1),
        }

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches of it done) at this moment of `fit`: every training batch so far (Lightning's
        total batch count, kept across resumes) over the batches of an epoch. Not Lightning's epoch counters:
        after a resume from a checkpoint saved at an epoch's last batch they do not count the next epoch as
        started, so a checkpoint written during it would say (that epoch, 0) and a second resume would
        train its batches again."""
        per_epoch = self.trainer.num_training_batches
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if not per_epoch or per_epoch == float("inf"):  # no fixed epoch length: nothing to resume part-way
            return self.trainer.current_epoch, 0
        epoch, done = divmod(int(batches), int(per_epoch))
        return epoch, done

    def state_dict(self) -> dict[str, Any]:
        """The training position (checkpointed by Lightning with every checkpoint of `fit`)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit" or "train" not in self.datasets:
            return {}
        epoch, done = self._train_position()
        return {
            "train_order": {**self._order_key(self.datasets["train"]), "epoch": epoch, "batches_done": done}
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict.get("train_order")

    def _resume_at(self, ds: SampleDataset) -> tuple[int, int] | None:
        """The loaded checkpoint's position (once), after checking it belongs to this training order."""
        state, self._resume = self._resume, None
        if not state:
            return None
        key = self._order_key(ds)
        saved = state.get("processes", key["processes"])  # older checkpoints did not record it
        if saved != key["processes"]:
            raise ValueError(
                f"the checkpoint was written by {saved} processes and this run has {key['processes']} "
                "(trainer.devices x trainer.num_nodes; under Slurm the tasks): each process reads its own shard, "
                f"so the remaining batches would differ; resume with {saved} processes (sbatch "
                "--ntasks-per-node), or start a new fit in another trainer.default_root_dir."
            )
        for name, value in key.items():
            if name != "processes" and state.get(name) != value:
                what = "data.data_dir / data.max_train_samples" if name == "train_rows" else f"data.{name}"
                raise ValueError(
                    f"the checkpoint was trained with another training order ({what}: {state.get(name)!r} "
                    f"there, {value!r} now); resume with the settings it was trained with, or start a new fit "
                    "in another trainer.default_root_dir."
                )
        return int(state["epoch"]), int(state["batches_done"])

    def _loader_options(self) -> dict[str, Any]:
        """The DataLoader settings every loader shares: workers, pinned memory, persistent workers."""
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        persistent = self.persistent_workers and self.num_workers > 0
        return {"num_workers": self.num_workers, "pin_memory": pin, "persistent_workers": persistent}

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collator(True),
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_file:
            return self._eval_loader(self.predict_split)
        if "predict" not in self.datasets:
            histories, self.predict_errors = read_histories(self.predict_file, Catalogue(self.titles))
            if not histories:
                first = self.predict_errors[0]
                raise HistoryFileError(
                    f"data.predict_file {self.predict_file}: no line holds a usable history "
                    f"(line {first.line}: {first.message})"
                )
            self.datasets["predict"] = HistoryDataset(self.encoder, histories)  # type: ignore[assignment]
        return DataLoader(
            self.datasets["predict"],
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collator(True),
            **self._loader_options(),
        )
