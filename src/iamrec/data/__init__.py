"""Processed dataset -> prompts with segment ids -> batches.

prompt.py      PromptTemplate: the prompt as text
encoding.py    tokens in context, `encode_answer` (the answer ids of the labels and of the decoding trie),
               truncation
dataset.py     the only reader of the processed-data contract (items.parquet, samples.parquet; see
               data_prep/common.py): `load_items`, `load_samples`, `eval_subset_rows`; SampleDataset
collate.py     padding into batch tensors (keys and shapes listed there)
sampler.py     length-bucketing batch sampler (DDP-safe)
datamodule.py  IAMDataModule

`IAMDataModule` is imported lazily: the most-popular baseline and `iamrec.reproduce` read the processed
data through this package and should not pay for importing Lightning.
"""

from typing import TYPE_CHECKING

from iamrec.data.collate import IGNORE_INDEX, Collator
from iamrec.data.dataset import (
    DataFileError,
    SampleDataset,
    Samples,
    check_processed,
    eval_subset_rows,
    load_items,
    load_samples,
)
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
        # lazy: the datamodule imports Lightning, which readers of processed data should not pay for
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
    "check_processed",
    "SequenceTooLongError",
    "TokenizationError",
    "encode_answer",
    "encode_answers",
    "eval_subset_rows",
    "load_items",
    "load_samples",
    "tokenize_in_context",
]
