"""What both beam searches return, and the argument checks they share.

Notation: ``B`` prompts, ``K`` beams, ``T`` the most answer tokens (EOS included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from iamrec.decoding.trie import TitleTrie

EarlyStopping = bool | Literal["never"]


@dataclass
class BeamResult:
    """The ``K`` best answers per prompt, best first.

    Attributes:
        sequences: ``(B, K, T)`` answer tokens (EOS included), EOS-filled after the answer's end.
        lengths: ``(B, K)`` answer lengths, EOS included.
        scores: ``(B, K)`` float32 HF sequence scores (sum of log-probs / length ** length_penalty).
        item_ids: ``(B, K)`` the (smallest) item id of each answer, -1 if it is not a catalogue answer.
        items: per prompt, per beam, every item id with that answer (duplicate titles give several).
        steps: decoding steps run (model calls after the prefill).
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    item_ids: torch.Tensor
    items: list[list[list[int]]]
    steps: int = 0

    def answer(self, prompt: int, beam: int) -> list[int]:
        """The token ids of one answer, EOS included."""
        return self.sequences[prompt, beam, : self.lengths[prompt, beam]].tolist()


def beam_result(trie: TitleTrie, tokens: torch.Tensor, scores: torch.Tensor, steps: int) -> BeamResult:
    """Normalise ``(B, K, T')`` generated tokens (anything after the first EOS ignored) to a BeamResult."""
    b, k, t = tokens.shape
    eos = trie.eos_token_id
    is_eos = tokens == eos
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, t)  # (B, K)
    pos = torch.arange(t, device=tokens.device)
    tokens = torch.where(pos < lengths[..., None], tokens, eos)
    nodes = trie.root(b * k).to(tokens.device)
    flat, flat_len = tokens.reshape(b * k, t), lengths.reshape(-1)
    for j in range(t):  # walk the answers down the trie, all beams at once
        nodes = torch.where(j < flat_len, trie.advance(nodes, flat[:, j]), nodes)
    # one read of the leaves from the device, then the items of each from the trie's host-side list
    nodes = torch.where(trie.is_leaf(nodes), nodes, -1).tolist()
    by_node = trie.items_by_node()
    items = [list(by_node[n]) if n >= 0 else [] for n in nodes]
    item_ids = torch.tensor([it[0] if it else -1 for it in items], dtype=torch.long).view(b, k)
    nested = [items[i * k : (i + 1) * k] for i in range(b)]
    return BeamResult(tokens, lengths, scores.float().view(b, k), item_ids, nested, steps)


def check_search(model: nn.Module, trie: TitleTrie, num_beams: int, early_stopping: EarlyStopping) -> None:
    """Reject a search both paths would run wrong: no beams, an unknown ``early_stopping``, or a trie built
    for another vocabulary than the model's LM head."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
    vocab = model.get_output_embeddings().weight.shape[0]
    if trie.vocab_size != vocab:
        raise ValueError(
            f"the trie was built for a vocabulary of {trie.vocab_size} tokens but the model's LM head has "
            f"{vocab}; build it with TitleTrie.from_sequences(answers, vocab_size={vocab})."
        )
