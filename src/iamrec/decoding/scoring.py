"""One search step's scoring: the LM head's logits and the top ``2K`` trie-allowed continuations.

Notation: ``B'`` prompts still searching, ``K`` beams, ``R = B' * K`` beam rows, ``V`` vocabulary, ``H``
hidden size, ``S`` allowed ``(beam row, token)`` pairs.

Both scorers return HF's ``(B', 2K)`` top continuations (scores and ``parent * V + token``):
`dense_top` HF's way over the whole vocabulary, `sparse_top` with log-probs of the allowed tokens only
(listed by `TitleTrie.allowed_edges`: their count is read from the device), `table_top` the same from the
trie's padded next-token table (a fixed block: no host sync).
"""

from __future__ import annotations

import torch
from torch import nn

from iamrec.attention import base_model
from iamrec.decoding.trie import TitleTrie

NEG = -1.0e9  # HF's "very large negative" score for impossible / placeholder beams


def normaliser(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, log(sum(exp(logits - max))))`` per row: log-softmax is ``(logits - max) - log_sum``."""
    row_max = logits.amax(dim=-1)
    return row_max, torch.exp(logits - row_max[:, None]).sum(dim=-1).log()


class LMHead:
    """The LM head for the search: float32 logits ``(R, V)`` of the last positions and, on request, their
    log-softmax normaliser (`normaliser`).

    With ``chunk`` set, a float32, bias-free ``nn.Linear`` head on CPU writes its product one slice of
    ``chunk`` vocabulary rows at a time into a buffer reused across steps (the same values, bit for bit),
    and reduces each slice for the normaliser while the slice is still in cache. One
    ``(320, 576) x (576, 49152)`` product runs at ~80-95 GFLOP/s on the 2-core dev CPU, because the 113 MB
    weight does not stay in cache; 2,048-row slices at ~95-115. Anything else calls the head module as HF
    does (``head(hidden).float()``). The logits are overwritten by the next call.
    """

    def __init__(self, model: nn.Module, chunk: int | None):
        self.module = base_model(model).get_output_embeddings()
        plain = type(self.module) is nn.Linear and self.module.bias is None
        self.chunk = chunk if plain and self.module.weight.dtype == torch.float32 else None
        self._buffer: torch.Tensor | None = None

    def __call__(
        self, hidden: torch.Tensor, normalise: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(logits (R, V), their (max, log_sum) or None)`` for ``hidden (R, H)``."""
        if self.chunk is None or hidden.device.type != "cpu" or hidden.dtype != torch.float32:
            logits = self.module(hidden).float()
            return logits, (normaliser(logits) if normalise else None)
        weight = self.module.weight  # (V, H)
        r, v = hidden.shape[0], weight.shape[0]
        if self._buffer is None or self._buffer.shape[0] < r:
            self._buffer = hidden.new_empty(r, v)
        logits, hidden, maxes, sums = self._buffer[:r], hidden.contiguous(), [], []
        for start in range(0, v, self.chunk):
            part = logits[:, start : start + self.chunk]
            torch.mm(hidden, weight[start : start + self.chunk].t(), out=part)
            if normalise:  # per slice: its max and sum(exp(part - max)), combined below
                maxes.append(part.amax(dim=-1))
                sums.append(torch.exp(part - maxes[-1][:, None]).sum(dim=-1))
        if not normalise:
            return logits, None
        slice_max, slice_sum = torch.stack(maxes, dim=-1), torch.stack(sums, dim=-1)  # (R, slices)
        row_max = slice_max.amax(dim=-1)
        log_sum = (slice_sum * torch.exp(slice_max - row_max[:, None])).sum(dim=-1).log()
        return logits, (row_max, log_sum)


def continuations(nodes: torch.Tensor, trie: TitleTrie) -> tuple[torch.Tensor, torch.Tensor]:
    """The (beam row, token) pairs a beam may continue with: its trie children; a complete or off-trie
    beam (no children) may only repeat EOS, as with HF's ``prefix_allowed_tokens_fn``."""
    flat = nodes.reshape(-1)
    rows, tokens = trie.allowed_edges(flat)
    dead = (torch.bincount(rows, minlength=flat.numel()) == 0).nonzero().view(-1)
    return torch.cat([rows, dead]), torch.cat([tokens, torch.full_like(dead, trie.eos_token_id)])


def dense_top(
    logits: torch.Tensor, nodes: torch.Tensor, run_scores: torch.Tensor, trie: TitleTrie
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's step over the whole vocabulary: ``(B', 2K)`` best scores and their ``parent * V + token``.

    Log-softmax, the trie's mask (HF: PrefixConstrainedLogitsProcessor), plus the running scores, then
    the top ``2K`` over all ``K * V`` continuations (HF: _get_top_k_continuations).
    """
    b, k = run_scores.shape
    v = trie.vocab_size
    log_probs = nn.functional.log_softmax(logits, dim=-1)  # (R, V)
    rows, tokens = continuations(nodes, trie)
    allowed = torch.zeros_like(log_probs, dtype=torch.bool)
    allowed[rows, tokens] = True
    log_probs.masked_fill_(~allowed, float("-inf"))  # log_probs is log_softmax's fresh tensor
    unsatisfiable = log_probs.amax(-1).isneginf().view(b, k).all(-1)  # (B',)
    if unsatisfiable.any():  # HF then forces the allowed tokens with score 0
        forced = torch.zeros_like(log_probs).masked_fill(~allowed, float("-inf"))
        log_probs = torch.where(unsatisfiable.repeat_interleave(k)[:, None], forced, log_probs)
    scores = (log_probs.view(b, k, v) + run_scores[:, :, None]).view(b, k * v)
    return torch.topk(scores, k=2 * k)


def sparse_top(
    logits: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor],
    nodes: torch.Tensor,
    run_scores: torch.Tensor,
    trie: TitleTrie,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dense_top` with the log-probs of the trie's allowed ``(row, token)`` pairs only.

    A disallowed continuation scores -inf in `dense_top`, so only the allowed pairs need a log-prob,
    ``(logit - max) - log_sum`` with `norm` = ``(max, log_sum)`` (`normaliser`: log-softmax's order of
    operations; its float32 sum of 49,152 exponentials runs in another order than HF's kernel, ~7e-6 apart
    per step on SmolLM2); they are written into a ``(B', K * V)`` canvas of -inf and the same top ``2K``
    runs on it. The canvas stays (rather than a top-k over the pairs alone) because deep in the trie a
    prompt's beams have fewer than ``2K`` live continuations, and HF then picks placeholder candidates
    (score about -1e9, many equal) in the tie order of its dense top-k; the same call on the same layout
    picks the same ones. What goes away is the vocabulary-wide log-softmax, mask and sums.
    """
    b, k = run_scores.shape
    v = trie.vocab_size
    rows, tokens = continuations(nodes, trie)  # (S,) each
    row_max, log_sum = norm
    pair_scores = (logits[rows, tokens] - row_max[rows]) - log_sum[rows] + run_scores.view(-1)[rows]  # (S,)
    scores = logits.new_full((b, k * v), float("-inf"))
    scores.view(-1)[rows * v + tokens] = pair_scores  # row r = prompt r // K, beam r % K
    return torch.topk(scores, k=2 * k)


def table_top(
    logits: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor],
    nodes: torch.Tensor,
    run_scores: torch.Tensor,
    trie: TitleTrie,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_top` with the allowed tokens from the trie's padded table (`TitleTrie.next_tokens`).

    The same pairs, scored by the same operations in the same order, written into the same canvas: the
    same top ``2K``, bit for bit. The pairs come as a fixed ``(R, C)`` block (padding written to a spare
    last canvas entry, left out of the top-k), so no step reads a pair count from the device: no host
    sync, and the shapes a step launches depend on ``R`` alone.
    """
    b, k = run_scores.shape
    v = trie.vocab_size
    tokens, valid = trie.next_tokens(nodes)  # (R, C) each
    row_max, log_sum = norm
    pair_scores = (logits.gather(1, tokens) - row_max[:, None]) - log_sum[:, None] + run_scores.view(-1, 1)
    rows = torch.arange(b * k, device=logits.device)[:, None]
    where = torch.where(valid, rows * v + tokens, b * k * v)  # padding -> the spare entry
    canvas = logits.new_full((b * k * v + 1,), float("-inf"))
    canvas[where.view(-1)] = torch.where(valid, pair_scores, float("-inf")).view(-1)
    return torch.topk(canvas[:-1].view(b, k * v), k=2 * k)
