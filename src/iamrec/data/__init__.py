"""Processed dataset -> prompts with segment ids -> batches (DESIGN.md §1, §3).

prompt.py      PromptTemplate: the prompt as text
encoding.py    tokens in context, `encode_answer` (shared with the decoding trie), truncation
dataset.py     reading/checking the processed files; map-style SampleDataset
collate.py     padding into batch tensors (keys and shapes listed there)
sampler.py     length-bucketing batch sampler (DDP-safe)
datamodule.py  IAMDataModule

`IAMDataModule` is imported lazily: the decoding package imports `encode_answer` from here and should
not pay for importing Lightning.
"""

from typing import TYPE_CHECKING

from iamrec.data.collate import IGNORE_INDEX, Collator
from iamrec.data.dataset import DataFileError, SampleDataset, Samples, load_items, load_samples
from iamrec.data.encoding import (
    EncodedSample,
    PromptEncoder,
    SequenceTooLongError,
    TokenizationError,
    encode_answer,
    encode_answers,
    tokenize_in_context,
)
from iamrec.data.prompt import PromptTemplate, PromptTemplateError
from iamrec.data.sampler import LengthGroupedBatchSampler

if TYPE_CHECKING:
    from iamrec.data.datamodule import IAMDataModule


def __getattr__(name: str):
    if name == "IAMDataModule":
        from iamrec.data.datamodule import IAMDataModule

        return IAMDataModule
    raise AttributeError(f"module 'iamrec.data' has no attribute '{name}'")


__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataFileError",
    "EncodedSample",
    "IAMDataModule",
    "LengthGroupedBatchSampler",
    "PromptEncoder",
    "PromptTemplate",
    "PromptTemplateError",
    "SampleDataset",
    "Samples",
    "SequenceTooLongError",
    "TokenizationError",
    "encode_answer",
    "encode_answers",
    "load_items",
    "load_samples",
    "tokenize_in_context",
]
