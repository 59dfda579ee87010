"""Trie-constrained beam search over the whole catalogue: a fast path and the HF reference path.

Notation: ``B`` prompts, ``L`` padded prompt length, ``K`` beams, ``V`` vocabulary, ``T`` the most
answer tokens (EOS included), ``R = B' * K`` model rows of the prompts still searching.

Both functions return the ``K`` best catalogue answers per prompt with HF's scores. They are the same
algorithm — `constrained_beam_search` is a line-by-line mirror of transformers v5
``GenerationMixin._beam_search`` (top ``2K`` candidates, finished hypotheses merged by score,
``early_stopping``, ``length_penalty``) — and the tests check that they return identical beams.

What the fast path does differently (only cost, never the result):

* **one prefill per prompt**: HF copies every prompt ``K`` times *before* the prefill, so it encodes
  each prompt ``K`` times; here the ``B`` prompts are encoded once (the decoder stack alone; the LM head
  then runs on the last position only);
* **one copy of the prompt's keys/values per prompt** (`shared_prompt` module): the ``K`` beams of a
  prompt share its prompt cache, only the answer tokens' keys/values are kept (and reordered) per beam,
  and a decode-step attention function scores both blocks with one softmax. With
  ``shared_prompt=False`` the prompt cache is copied to the beams instead
  (``cache.batch_repeat_interleave(K)``, every cache layer including the extra slots of stacked
  schedules) and the model's own attention runs; both are tested against HF;
* **log-probs of the allowed tokens only** (`_sparse_top`): ``TitleTrie.allowed_edges`` lists the
  allowed ``(beam, token)`` pairs of all ``R`` beams at once (no Python call per beam that walks a
  dict, as ``prefix_allowed_tokens_fn`` does), and only those pairs get a log-prob; no
  vocabulary-wide log-softmax, mask or sum (``sparse=False`` runs HF's way, `_dense_top`);
* **the LM head in vocabulary slices on CPU** (`_Head`): the same product, faster while each slice's
  weights stay in cache, with the log-softmax normaliser reduced slice by slice;
* **settled prompts leave the batch**: a prompt whose ``K`` result slots hold real finished answers and
  that can no longer change (see `_settled`) is written out and its rows are dropped from the cache, so
  a batch only computes the prompts still searching.

Settings under which the two paths are identical (`beam_generation_config` builds them for HF): greedy
beams (``do_sample=False``), ``num_return_sequences = num_beams``, ``max_new_tokens`` = the longest
answer (``trie.max_depth``), ``eos_token_id`` = the answers' EOS and no other logits processor (the
model's own ``generation_config`` is swapped out during the reference call, so its defaults cannot leak
in). Defaults ``length_penalty=0.0`` (scores are plain sums of log-probs; HF divides by
``length ** length_penalty``, so 0 means no normalisation) and ``early_stopping=True`` (a prompt stops
as soon as it has ``K`` finished answers — with ``length_penalty=0`` a running beam's score only falls,
so it stops when no running beam can beat the finished ones). Other values are mirrored too.

A beam whose answer is already complete (a trie leaf) or off the trie may only continue with EOS, in
both paths. Such beams are filler HF keeps when fewer than ``K`` live candidates exist (they score about
-1e9 and appear in results only when a prompt cannot find ``K`` catalogue answers).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import GenerationConfig

from iamrec.decoding.shared_prompt import (
    SharedPrompt,
    SharedPromptCache,
    _hf,
    decode_attention,
    item_state,
)
from iamrec.decoding.trie import TitleTrie

EarlyStopping = bool | Literal["never"]
_NEG = -1.0e9  # HF's "very large negative" score for impossible / placeholder beams


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


def _result(trie: TitleTrie, tokens: torch.Tensor, scores: torch.Tensor, steps: int) -> BeamResult:
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
    leaf = trie.is_leaf(nodes)
    items = [trie.items_at(int(n)) if ok else [] for n, ok in zip(nodes.tolist(), leaf.tolist())]
    item_ids = torch.tensor([it[0] if it else -1 for it in items], dtype=torch.long).view(b, k)
    nested = [items[i * k : (i + 1) * k] for i in range(b)]
    return BeamResult(tokens, lengths, scores.float().view(b, k), item_ids, nested, steps)


def _check(model: nn.Module, trie: TitleTrie, num_beams: int, early_stopping: EarlyStopping) -> None:
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


def _prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as HF generate derives them from a left-padded mask (padding gets 0)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    """The cache argument's name: ``cache`` from transformers 5.2x on, ``past_key_values`` before (5.17)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _forward(model: nn.Module, cache, **kwargs) -> tuple[torch.Tensor, Any]:
    """One call of the decoder stack (the LM head is `_Head`); returns the last position's hidden states
    ``(R, H)`` and the cache."""
    if kwargs.get("segment_ids") is None:
        kwargs.pop("segment_ids", None)
    decoder = _hf(model).get_decoder()  # e.g. LlamaModel: the decoder stack, no LM head
    kwargs[_cache_keyword_of(type(decoder))] = cache
    out = decoder(use_cache=True, **kwargs)
    cache = getattr(out, "cache", None) or out.past_key_values
    return out.last_hidden_state[:, -1], cache


def _normaliser(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, log(sum(exp(logits - max))))`` per row: log-softmax is ``(logits - max) - log_sum``."""
    row_max = logits.amax(dim=-1)
    return row_max, torch.exp(logits - row_max[:, None]).sum(dim=-1).log()


class _Head:
    """The LM head for the search: float32 logits ``(R, V)`` of the last positions and, on request, their
    log-softmax normaliser (`_normaliser`).

    With ``chunk`` set, a float32, bias-free ``nn.Linear`` head on CPU writes its product one slice of
    ``chunk`` vocabulary rows at a time into a buffer reused across steps (the same values, bit for bit),
    and reduces each slice for the normaliser while the slice is still in cache. One
    ``(320, 576) x (576, 49152)`` product runs at ~80-95 GFLOP/s on the 2-core dev CPU, because the 113 MB
    weight does not stay in cache; 2,048-row slices at ~95-115. Anything else calls the head module as HF
    does (``head(hidden).float()``). The logits are overwritten by the next call.
    """

    def __init__(self, model: nn.Module, chunk: int | None):
        self.module = _hf(model).get_output_embeddings()
        plain = type(self.module) is nn.Linear and self.module.bias is None
        self.chunk = chunk if plain and self.module.weight.dtype == torch.float32 else None
        self._buffer: torch.Tensor | None = None

    def __call__(
        self, hidden: torch.Tensor, normalise: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(logits (R, V), their (max, log_sum) or None)`` for ``hidden (R, H)``."""
        if self.chunk is None or hidden.device.type != "cpu" or hidden.dtype != torch.float32:
            logits = self.module(hidden).float()
            return logits, (_normaliser(logits) if normalise else None)
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


def _continuations(nodes: torch.Tensor, trie: TitleTrie) -> tuple[torch.Tensor, torch.Tensor]:
    """The (beam row, token) pairs a beam may continue with: its trie children; a complete or off-trie
    beam (no children) may only repeat EOS, as with HF's ``prefix_allowed_tokens_fn``."""
    flat = nodes.reshape(-1)
    rows, tokens = trie.allowed_edges(flat)
    dead = (torch.bincount(rows, minlength=flat.numel()) == 0).nonzero().view(-1)
    return torch.cat([rows, dead]), torch.cat([tokens, torch.full_like(dead, trie.eos_token_id)])


def _dense_top(
    logits: torch.Tensor, nodes: torch.Tensor, run_scores: torch.Tensor, trie: TitleTrie
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's step over the whole vocabulary: ``(B', 2K)`` best scores and their ``parent * V + token``.

    Log-softmax, the trie's mask (HF: PrefixConstrainedLogitsProcessor), plus the running scores, then
    the top ``2K`` over all ``K * V`` continuations (HF: _get_top_k_continuations).
    """
    b, k = run_scores.shape
    v = trie.vocab_size
    log_probs = nn.functional.log_softmax(logits, dim=-1)  # (R, V)
    rows, tokens = _continuations(nodes, trie)
    allowed = torch.zeros_like(log_probs, dtype=torch.bool)
    allowed[rows, tokens] = True
    log_probs.masked_fill_(~allowed, float("-inf"))  # log_probs is log_softmax's fresh tensor
    unsatisfiable = log_probs.amax(-1).isneginf().view(b, k).all(-1)  # (B',)
    if unsatisfiable.any():  # HF then forces the allowed tokens with score 0
        forced = torch.zeros_like(log_probs).masked_fill(~allowed, float("-inf"))
        log_probs = torch.where(unsatisfiable.repeat_interleave(k)[:, None], forced, log_probs)
    scores = (log_probs.view(b, k, v) + run_scores[:, :, None]).view(b, k * v)
    return torch.topk(scores, k=2 * k)


def _sparse_top(
    logits: torch.Tensor,
    normaliser: tuple[torch.Tensor, torch.Tensor],
    nodes: torch.Tensor,
    run_scores: torch.Tensor,
    trie: TitleTrie,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_dense_top` with the log-probs of the trie's allowed ``(row, token)`` pairs only.

    A disallowed continuation scores -inf in `_dense_top`, so only the allowed pairs need a log-prob,
    ``(logit - max) - log_sum`` with `normaliser` = ``(max, log_sum)`` (`_normaliser`: log-softmax's
    order of operations; its float32 sum of 49,152 exponentials runs in another order than HF's kernel,
    ~7e-6 apart per step on SmolLM2); they are written into a ``(B', K * V)`` canvas of -inf and the same top
    ``2K`` runs on it. The canvas stays (rather than a top-k over the pairs alone) because deep in the
    trie a prompt's beams have fewer than ``2K`` live continuations, and HF then picks placeholder
    candidates (score about -1e9, many equal) in the tie order of its dense top-k; the same call on the
    same layout picks the same ones. What goes away is the vocabulary-wide log-softmax, mask and sums.
    """
    b, k = run_scores.shape
    v = trie.vocab_size
    rows, tokens = _continuations(nodes, trie)  # (S,) each
    row_max, log_sum = normaliser
    pair_scores = (logits[rows, tokens] - row_max[rows]) - log_sum[rows] + run_scores.view(-1)[rows]  # (S,)
    scores = logits.new_full((b, k * v), float("-inf"))
    scores.view(-1)[rows * v + tokens] = pair_scores  # row r = prompt r // K, beam r % K
    return torch.topk(scores, k=2 * k)


@torch.no_grad()
def constrained_beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    trie: TitleTrie,
    num_beams: int,
    max_new_tokens: int | None = None,
    length_penalty: float = 0.0,
    early_stopping: EarlyStopping = True,
    drop_settled: bool = True,
    shared_prompt: bool = True,
    sparse: bool = True,
    head_chunk: int | None = 2048,
) -> BeamResult:
    """Beam search over the catalogue answers in `trie`, equal to `reference_beam_search` (HF generate).

    Args:
        model: a causal LM (with `apply_item_attention` installed when `segment_ids` are given).
        input_ids: ``(B, L)`` left-padded prompts ending with the response header.
        attention_mask: ``(B, L)`` 1 for tokens, 0 for left padding (None: no padding).
        segment_ids: ``(B, L)`` prompt segment ids (generated tokens are TARGET implicitly), or None.
        trie: the catalogue's answers (`TitleTrie.from_sequences`).
        num_beams: beams per prompt, also the number of answers returned.
        max_new_tokens: most answer tokens; default the longest answer (``trie.max_depth``).
        length_penalty: HF's; scores are divided by ``length ** length_penalty``.
        early_stopping: HF's (True: a prompt stops once it has ``num_beams`` finished answers).
        drop_settled: drop prompts whose results can no longer change from the batch (speed only).
        shared_prompt: keep the prompt's keys/values once per prompt (`shared_prompt` module; speed
            only); False copies them to every beam (the stock cache layout).
        sparse: score only the trie's allowed tokens (`_sparse_top`; speed only); False scores the whole
            vocabulary as HF does (`_dense_top`).
        head_chunk: vocabulary rows per slice of the LM head product on CPU (`_Head`; speed only); None:
            one product.
    """
    _check(model, trie, num_beams, early_stopping)
    device = input_ids.device
    if trie.child_ptr.device != device:
        trie.to(device)
    B, L = input_ids.shape  # noqa: N806
    K, V, eos = num_beams, trie.vocab_size, trie.eos_token_id  # noqa: N806
    T = max_new_tokens or trie.max_depth  # noqa: N806
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = _prompt_positions(attention_mask)
    # HF drops an all-ones mask (no padding) before the prefill; do the same so the kernels match.
    mask = None if bool((attention_mask == 1).all()) else attention_mask

    # 1. encode each prompt once; its cache is then shared by its beams (or copied to each beam)
    head = _Head(model, head_chunk)
    hidden, cache = _forward(
        model, None, input_ids=input_ids, attention_mask=mask, position_ids=positions, segment_ids=segment_ids
    )
    logits, norm = head(hidden, normalise=sparse)
    logits = logits.repeat_interleave(K, 0)  # (B*K, V)
    norm = tuple(x.repeat_interleave(K, 0) for x in norm) if sparse else None  # 2 x (B*K,)
    if shared_prompt:
        cache = SharedPromptCache(cache, capacity=T)
        slot_kind, context_visible = item_state(model)
        rows_mask, rows_seg = mask, segment_ids  # (B', L): per prompt, for the attention bias
    else:
        cache.batch_repeat_interleave(K)
        rows_mask = mask.repeat_interleave(K, 0) if mask is not None else None  # (R, L)
        rows_seg = segment_ids.repeat_interleave(K, 0) if segment_ids is not None else None  # (R, L)
    rows_pos = positions[:, -1:].repeat_interleave(K, 0) + 1  # (R, 1) position of the first answer token

    # 2. search state (mirrors _beam_search's tensors, minus the prompt columns)
    active = torch.arange(B, device=device)  # original index of each prompt still searching
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = _NEG  # only beam 0 is live at first: all beams hold the same prompt
    run_tokens = torch.full((B, K, T), eos, dtype=torch.long, device=device)
    nodes = trie.root(B, K)
    fin_tokens = run_tokens.clone()
    fin_scores = torch.full((B, K), _NEG, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_k_mask = torch.arange(2 * K, device=device) < K  # only the best K candidates may finish
    out_tokens = torch.full((B, K, T), eos, dtype=torch.long, device=device)
    out_scores = torch.full((B, K), _NEG, device=device)
    steps = 0

    for t in range(T):
        b = active.numel()
        # a-b. the top 2K continuations over all beams, restricted to the trie (HF:
        # PrefixConstrainedLogitsProcessor, then _get_top_k_continuations)
        if sparse:
            top_scores, top_idx = _sparse_top(logits, norm, nodes, run_scores, trie)
        else:
            top_scores, top_idx = _dense_top(logits, nodes, run_scores, trie)
        parent, token = top_idx // V, top_idx % V
        cand_tokens = torch.take_along_dim(run_tokens, parent[..., None], dim=1)  # (B', 2K, T)
        cand_tokens[:, :, t] = token
        cand_nodes = trie.advance(torch.take_along_dim(nodes, parent, dim=1), token)
        hits = (token == eos) | (t + 1 >= T)  # HF's EOS and max-length stopping criteria

        # c. the K best unfinished candidates keep running (HF: _get_running_beams_for_next_iteration)
        running = top_scores + hits.to(torch.float32) * _NEG
        keep = torch.topk(running, k=K)[1]  # (B', K)
        run_tokens = torch.take_along_dim(cand_tokens, keep[..., None], dim=1)
        run_scores = torch.take_along_dim(running, keep, dim=1)
        nodes = torch.take_along_dim(cand_nodes, keep, dim=1)
        parent = torch.take_along_dim(parent, keep, dim=1)

        # d. merge newly finished answers into the K result slots (HF: _update_finished_beams)
        just_finished = hits & top_k_mask[None, :]
        finished = top_scores / ((t + 1) ** length_penalty)
        full = torch.all(fin_done, dim=-1, keepdim=True) & (early_stopping is True)
        finished += full.to(torch.float32) * _NEG
        finished += (~improvable).to(torch.float32) * _NEG
        finished += (~just_finished) * _NEG
        merged = torch.topk(torch.cat((fin_scores, finished), dim=1), k=K)[1]
        fin_tokens = torch.take_along_dim(
            torch.cat((fin_tokens, cand_tokens), dim=1), merged[..., None], dim=1
        )
        fin_scores = torch.take_along_dim(torch.cat((fin_scores, finished), dim=1), merged, dim=1)
        fin_done = torch.take_along_dim(torch.cat((fin_done, just_finished), dim=1), merged, dim=1)

        # e. can a running beam still beat the finished ones? (HF: _check_early_stop_heuristic)
        hyp_len = T if (early_stopping == "never" and length_penalty > 0.0) else t + 1
        best_running = run_scores[:, :1] / (hyp_len**length_penalty)
        worst_finished = torch.where(fin_done, torch.min(fin_scores, dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        go_on = (
            bool(improvable.any())
            and not (bool(fin_done.all()) and early_stopping is True)
            and not bool(hits.all())
        )

        # f. write out prompts that are settled (or all, at the end); keep the rest searching
        settled = _settled(fin_done, fin_scores, improvable, early_stopping) if drop_settled else None
        if not go_on or t + 1 == T:
            settled = torch.ones(b, dtype=torch.bool, device=device)
        if settled is not None and settled.any():
            out_tokens[active[settled]] = fin_tokens[settled]
            out_scores[active[settled]] = fin_scores[settled]
            if bool(settled.all()):
                break
            stay = ~settled
            active, run_scores, run_tokens, nodes = (
                active[stay],
                run_scores[stay],
                run_tokens[stay],
                nodes[stay],
            )
            fin_tokens, fin_scores, fin_done = fin_tokens[stay], fin_scores[stay], fin_done[stay]
            improvable, parent = improvable[stay], parent[stay]
            kept = stay.nonzero().view(-1)
            rows = stay.repeat_interleave(K)
            sel = kept if shared_prompt else rows  # rows_mask / rows_seg are per prompt or per beam
            rows_mask = rows_mask[sel] if rows_mask is not None else None
            rows_seg = rows_seg[sel] if rows_seg is not None else None
            rows_pos = rows_pos[rows]
            b_offset = kept.view(-1, 1) * K  # old row offsets of the prompts that stay
        else:
            kept = None
            b_offset = torch.arange(b, device=device).view(-1, 1) * K

        # g. reorder (and shrink) the cache to the surviving beams, then run one token per beam
        beam_rows = (b_offset + parent).view(-1)
        step = dict(input_ids=run_tokens[:, :, t].reshape(-1, 1), position_ids=rows_pos + t)
        if shared_prompt:
            cache.select(kept, beam_rows)
            prompt = SharedPrompt(cache, K, rows_mask, rows_seg, slot_kind, context_visible, t + 1)
            # segment_ids only switch the stacked passes on; the kinds' masks come from `prompt`
            with decode_attention(model):
                hidden, cache = _forward(model, cache, segment_ids=rows_seg, iam_prompt=prompt, **step)
        else:
            cache.reorder_cache(beam_rows)
            step_mask = None
            if rows_mask is not None:
                step_mask = torch.cat([rows_mask, rows_mask.new_ones(rows_mask.shape[0], t + 1)], dim=1)
            hidden, cache = _forward(model, cache, attention_mask=step_mask, segment_ids=rows_seg, **step)
        logits, norm = head(hidden, normalise=sparse)
        steps += 1
    return _result(trie, out_tokens, out_scores, steps)


def _settled(
    fin_done: torch.Tensor, fin_scores: torch.Tensor, improvable: torch.Tensor, early_stopping: EarlyStopping
) -> torch.Tensor:
    """``(B',)`` prompts whose K result slots can no longer change, whatever the rest of the batch does.

    In HF a prompt stops accepting answers once all its slots are finished (``early_stopping=True``) or
    no running beam can beat them; every later candidate then carries a -1e9 penalty, so slots that hold
    real answers (scores far above -1e9) are final. Prompts with placeholder slots keep searching,
    exactly as in HF.
    """
    frozen = ~improvable[:, 0] | (fin_done.all(-1) & (early_stopping is True))
    return frozen & fin_done.all(-1) & (fin_scores.min(-1)[0] > _NEG / 2)


# ------------------------------------------------------------------------------------------ reference


def beam_generation_config(
    trie: TitleTrie,
    num_beams: int,
    max_new_tokens: int | None = None,
    length_penalty: float = 0.0,
    early_stopping: EarlyStopping = True,
    pad_token_id: int | None = None,
) -> GenerationConfig:
    """The explicit HF generation settings under which `generate` equals `constrained_beam_search`."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens or trie.max_depth,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=trie.eos_token_id,
        pad_token_id=trie.eos_token_id if pad_token_id is None else pad_token_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        use_cache=True,
        output_scores=True,
        return_dict_in_generate=True,
    )


@contextlib.contextmanager
def _blank_generation_defaults(model: nn.Module):
    """Swap the model's stored generation_config for a blank one, so none of its values fills ours."""
    hf = _hf(model)
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


def prefix_table(trie: TitleTrie) -> dict[tuple[int, ...], list[int]]:
    """Every proper prefix of every answer -> the tokens that may follow it (the D3 / MiniOneRec dict)."""
    nxt: dict[tuple[int, ...], set[int]] = {}
    for seq in trie.sequences:
        for i in range(len(seq)):
            nxt.setdefault(seq[:i], set()).add(seq[i])
    return {prefix: sorted(tokens) for prefix, tokens in nxt.items()}


@torch.no_grad()
def reference_beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    trie: TitleTrie,
    num_beams: int,
    max_new_tokens: int | None = None,
    length_penalty: float = 0.0,
    early_stopping: EarlyStopping = True,
    table: dict[tuple[int, ...], list[int]] | None = None,
) -> BeamResult:
    """The simple path: HF ``generate`` with a ``prefix_allowed_tokens_fn`` that looks up the answer so far.

    Same arguments and result as `constrained_beam_search`; `table` is `prefix_table(trie)`, built on
    each call unless given.
    """
    _check(model, trie, num_beams, early_stopping)
    if num_beams < 2:
        raise ValueError("reference_beam_search needs num_beams >= 2 (HF generate runs greedy search for 1).")
    table = prefix_table(trie) if table is None else table
    prompt_len, eos = input_ids.shape[1], [trie.eos_token_id]

    def allowed(batch_id: int, sequence: torch.Tensor) -> list[int]:
        return table.get(tuple(sequence[prompt_len:].tolist()), eos)  # complete / off-trie: EOS only

    config = beam_generation_config(trie, num_beams, max_new_tokens, length_penalty, early_stopping)
    kwargs = {} if segment_ids is None else {"segment_ids": segment_ids}
    with _blank_generation_defaults(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
            generation_config=config,
            prefix_allowed_tokens_fn=allowed,
            **kwargs,
        )
    b = input_ids.shape[0]
    tokens = out.sequences[:, prompt_len:].reshape(b, num_beams, -1)
    return _result(trie, tokens, out.sequences_scores.view(b, num_beams), tokens.shape[-1])
