"""Pad encoded samples into a batch of tensors.

Batch keys (B = batch size, L = longest full sequence, P = longest prompt, both rounded up to
`pad_to_multiple_of`):

    input_ids        (B, L) long   prompt + answer + EOS, padded with the tokenizer's pad id
    attention_mask   (B, L) long   1 on tokens, 0 on padding
    labels           (B, L) long   = input_ids on the TARGET tokens (answer + EOS), -100 elsewhere;
                                   aligned with input_ids (HF causal LMs shift them internally)
    target_positions (B, A) long   the positions t whose next token t + 1 is a target token, in order,
                                   then other positions (A = most target tokens in a row, rounded up
                                   to `TARGET_MULTIPLE`, at most L - 1); see `target_positions`
    target_labels    (B, A) long   labels[t + 1] of those positions (-100 on the filler ones)
    segment_ids      (B, L) long   CONTEXT / 1..n / TARGET, PAD (-1) on padding
    target           (B,)   long   target item id
    user_id          (B,)   long
    sample_index     (B,)   long   row of the sample in samples.parquet
  evaluation only (`with_prompt=True`), always LEFT-padded so generation continues every row at the end:
    prompt_input_ids       (B, P) long   input_ids up to and including the response header
    prompt_attention_mask  (B, P) long
    prompt_segment_ids     (B, P) long
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from iamrec.segments import PAD

IGNORE_INDEX = -100
TARGET_MULTIPLE = 8  # the target-position width A rounds up to this (few distinct shapes to compile)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad_sequences(
    rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"], length: int
) -> torch.Tensor:
    """(B, length) long tensor of `rows`, filled with `value` on the `side` they do not reach."""
    out = np.full((len(rows), length), value, dtype=np.int64)  # numpy: ~10x faster than per-row torch
    for b, row in enumerate(rows):
        if len(row) == 0:
            continue
        if side == "right":
            out[b, : len(row)] = row
        else:
            out[b, length - len(row) :] = row
    return torch.from_numpy(out)


def target_positions(labels: torch.Tensor, multiple: int = TARGET_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions (B, A), their labels (B, A))``: per row, the positions whose next token is a target
    token (``labels[:, 1:] != -100``), in order, then filler positions labelled -100.

    ``A`` is the most target tokens in a row, rounded up to `multiple` (at most ``L - 1``), so the loss can
    gather the target positions with a plain index and weigh the filler by 0 through ``ignore_index``:
    no boolean-mask indexing, whose output size the host must read from the device. The collator calls it
    on CPU (`Collator`); the size ``A`` is read there, before the batch reaches the GPU.
    """
    shifted = labels[:, 1:]  # position t predicts token t + 1
    where = shifted != IGNORE_INDEX
    most = int(where.sum(1).max()) if where.numel() else 0
    width = min(_round_up(max(most, 1), multiple), shifted.shape[1])
    # a stable sort of "not a target" puts each row's target positions first, in their order
    order = torch.sort((~where).to(torch.uint8), dim=1, stable=True)[1][:, :width]
    return order, torch.take_along_dim(shifted, order, dim=1)


@dataclass
class Collator:
    """Turns a list of dataset rows (see `SampleDataset.__getitem__`) into a batch dict of tensors.

    Args:
        pad_token_id: Token id written on padding (never attended to).
        padding_side: Side of the full sequences that gets the padding; the prompt is always left-padded.
        pad_to_multiple_of: Round L and P up to a multiple of this (stable shapes for compiled kernels).
        with_prompt: Also emit the left-padded prompt (validation / test / predict).
    """

    pad_token_id: int
    padding_side: Literal["left", "right"] = "right"
    pad_to_multiple_of: int | None = None
    with_prompt: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got '{self.padding_side}'.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}.")

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        segs = [r["segment_ids"] for r in rows]
        labels = [[IGNORE_INDEX] * r["prompt_length"] + r["input_ids"][r["prompt_length"] :] for r in rows]
        length = _round_up(max(len(x) for x in ids), self.pad_to_multiple_of)
        side = self.padding_side
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, side, length),
            "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0, side, length),
            "labels": pad_sequences(labels, IGNORE_INDEX, side, length),
            "segment_ids": pad_sequences(segs, PAD, side, length),
            "target": torch.tensor([r["target"] for r in rows], dtype=torch.long),
            "user_id": torch.tensor([r["user_id"] for r in rows], dtype=torch.long),
            "sample_index": torch.tensor([r["sample_index"] for r in rows], dtype=torch.long),
        }
        batch["target_positions"], batch["target_labels"] = target_positions(batch["labels"])
        if self.with_prompt:
            p_ids = [r["input_ids"][: r["prompt_length"]] for r in rows]
            p_len = _round_up(max(len(x) for x in p_ids), self.pad_to_multiple_of)
            batch["prompt_input_ids"] = pad_sequences(p_ids, self.pad_token_id, "left", p_len)
            batch["prompt_attention_mask"] = pad_sequences([[1] * len(x) for x in p_ids], 0, "left", p_len)
            batch["prompt_segment_ids"] = pad_sequences(
                [r["segment_ids"][: r["prompt_length"]] for r in rows], PAD, "left", p_len
            )
        return batch
