"""Beams -> recommendations: the constrained search over a batch of prompts and its distinct catalogue
answers, best first. Shared by `iamrec.recommend.Recommender` and `IAMRecModule.predict_step`.

Scores are HF beam scores: the sum of the title's token log-probabilities (EOS included) under the
model, ``length_penalty=0`` as in evaluation; higher is better. A title that several items share names the
smallest of their ids; a repeated or off-catalogue answer is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from iamrec.decoding.beam import constrained_beam_search
from iamrec.decoding.result import BeamResult
from iamrec.decoding.trie import TitleTrie


@dataclass(frozen=True)
class Recommendation:
    """One recommended item: its id (items.parquet), title and beam score (higher is better)."""

    item_id: int
    title: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def search(model: nn.Module, batch: dict[str, torch.Tensor], trie: TitleTrie, num_beams: int) -> BeamResult:
    """Constrained beam search over the catalogue for the left-padded prompts of a `Collator` batch."""
    return constrained_beam_search(
        model,
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        batch["prompt_segment_ids"],
        trie,
        num_beams=num_beams,
    )


def top_recommendations(
    result: BeamResult, titles: Sequence[str], k: int | None = None
) -> list[list[Recommendation]]:
    """Per prompt, its beams' catalogue answers best first, each title once, at most `k` (None: all)."""
    out = []
    scores = result.scores.tolist()
    for items_per_beam, beam_scores in zip(result.items, scores):
        recs: list[Recommendation] = []
        seen: set[int] = set()
        for items, score in zip(items_per_beam, beam_scores):
            item = min(items) if items else -1
            if item < 0 or item in seen:  # off the catalogue, or a repeat filling a free slot
                continue
            seen.add(item)
            recs.append(Recommendation(item, titles[item], float(score)))
        out.append(recs[:k] if k is not None else recs)
    return out
