"""Trie-constrained beam search over the whole catalogue, fast: `constrained_beam_search`.

Notation: ``B`` prompts, ``L`` padded prompt length, ``K`` beams, ``V`` vocabulary, ``T`` the most
answer tokens (EOS included), ``B'`` prompts still searching, ``R = B' * K`` their model rows.

It returns the ``K`` best catalogue answers per prompt with HF's scores, the same beams as
`reference_beam_search` (HF ``generate``; the tests check it): it mirrors transformers v5
``GenerationMixin._beam_search`` (top ``2K`` candidates, finished hypotheses merged by score,
``early_stopping``, ``length_penalty``). The loop reads as HF's steps, one helper each, on one
`_BeamState` (HF's tensors minus the prompt columns, plus the decode cache and its prompt rows):

    a-b  `_top_candidates`     the top 2K trie-allowed continuations (HF: _get_top_k_continuations)
    c    `_keep_running`       the K best unfinished ones run on (_get_running_beams_for_next_iteration)
    d    `_update_finished`    finished answers merged into the K result slots (_update_finished_beams)
    e    `_check_early_stop`   can a running beam still beat them? (_check_early_stop_heuristic)
    f    `_settled`, `_BeamState.write_out` / `keep`: settled prompts written out and dropped
    g    `_ModelRunner.step`   reorder the cache to the running beams, one token per beam

What it does differently from HF (only cost, never the result):

* **one prefill per prompt**: HF copies every prompt ``K`` times *before* the prefill, so it encodes
  each prompt ``K`` times; here the ``B`` prompts are encoded once (the decoder stack alone; the LM head
  then runs on the last position only);
* **one copy of the prompt's keys/values per prompt** (`shared_prompt` module): the ``K`` beams of a
  prompt share its prompt cache, only the answer tokens' keys/values are kept (and reordered) per beam,
  and a decode-step attention function scores both blocks with one softmax. With
  ``shared_prompt=False`` the prompt cache is copied to the beams instead
  (``cache.batch_repeat_interleave(K)``, every cache layer including the extra slots of stacked
  schedules) and the model's own attention runs; both are tested against HF;
* **log-probs of the allowed tokens only** (`scoring.sparse_top`): ``TitleTrie.allowed_edges`` lists
  the allowed ``(beam, token)`` pairs of all ``R`` beams at once (no Python call per beam that walks a
  dict, as ``prefix_allowed_tokens_fn`` does), and only those pairs get a log-prob; no
  vocabulary-wide log-softmax, mask or sum (``sparse=False`` runs HF's way, `scoring.dense_top`);
* **the LM head in vocabulary slices on CPU** (`scoring.LMHead`): the same product, faster while each
  slice's weights stay in cache, with the log-softmax normaliser reduced slice by slice;
* **settled prompts leave the batch**: a prompt whose ``K`` result slots hold real finished answers and
  that can no longer change (see `_settled`) is written out and its rows are dropped from the cache, so
  a batch only computes the prompts still searching.

A beam whose answer is already complete (a trie leaf) or off the trie may only continue with EOS, as in
HF with ``prefix_allowed_tokens_fn``. Such beams are filler HF keeps when fewer than ``K`` live
candidates exist (they score about -1e9 and appear in results only when a prompt cannot find ``K``
catalogue answers).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from iamrec.attention import base_model
from iamrec.decoding.result import BeamResult, EarlyStopping, beam_result, check_search
from iamrec.decoding.scoring import NEG, LMHead, dense_top, sparse_top
from iamrec.decoding.shared_prompt import SharedPrompt, SharedPromptCache, decode_attention, item_state
from iamrec.decoding.trie import TitleTrie


def _prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as HF generate derives them from a left-padded mask (padding gets 0)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    """The cache argument's name: ``cache`` from transformers 5.2x on, ``past_key_values`` before (5.17)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _forward(model: nn.Module, cache, **kwargs) -> tuple[torch.Tensor, Any]:
    """One call of the decoder stack (the LM head is `scoring.LMHead`); returns the last position's hidden
    states ``(R, H)`` and the cache."""
    if kwargs.get("segment_ids") is None:
        kwargs.pop("segment_ids", None)
    decoder = base_model(model).get_decoder()  # e.g. LlamaModel: the decoder stack, no LM head
    kwargs[_cache_keyword_of(type(decoder))] = cache
    out = decoder(use_cache=True, **kwargs)
    cache = getattr(out, "cache", None) or out.past_key_values
    return out.last_hidden_state[:, -1], cache


@dataclass
class _BeamState:
    """What the search carries from one step to the next, for the ``B'`` prompts still searching.

    The search tensors are HF ``_beam_search``'s minus the prompt columns; the model side holds what the
    next decode step needs per prompt or beam row. `keep` shrinks both together when prompts settle.
    """

    # search (HF: running_sequences, running_beam_scores, sequences, beam_scores, is_sent_finished, ...)
    active: torch.Tensor  # (B',) original index of each prompt still searching
    run_tokens: torch.Tensor  # (B', K, T) the running beams' answers so far, EOS-filled ahead
    run_scores: torch.Tensor  # (B', K) their sums of log-probs (-1e9: placeholder beam)
    nodes: torch.Tensor  # (B', K) their trie nodes (-1: off the trie)
    parent: torch.Tensor  # (B', K) the beam of the previous step each running beam extends
    fin_tokens: torch.Tensor  # (B', K, T) the K result slots: finished answers, best first
    fin_scores: torch.Tensor  # (B', K) their scores / length ** length_penalty (-1e9: empty)
    fin_done: torch.Tensor  # (B', K) bool: the slot holds a finished answer
    improvable: torch.Tensor  # (B', 1) bool: a running beam may still beat the finished answers
    # model side: the decode cache and the prompt rows the next step attends to
    cache: Any  # SharedPromptCache (prompt once per prompt) or the model's cache (prompt per beam)
    rows_mask: torch.Tensor | None  # (B', L) if the prompt is shared, else (R, L); None: no padding
    rows_seg: torch.Tensor | None  # segment ids, rows as `rows_mask`; None: stock attention
    rows_pos: torch.Tensor  # (R, 1) position of each beam's first answer token
    # results of all B prompts, written as they settle
    out_tokens: torch.Tensor  # (B, K, T)
    out_scores: torch.Tensor  # (B, K)

    @classmethod
    def start(
        cls,
        trie: TitleTrie,
        k: int,
        t: int,
        cache: Any,
        rows_mask: torch.Tensor | None,
        rows_seg: torch.Tensor | None,
        rows_pos: torch.Tensor,
    ) -> _BeamState:
        """Before the first step: beam 0 of each prompt is live, the other beams and all slots empty."""
        b, device = rows_pos.shape[0] // k, rows_pos.device
        run_scores = torch.zeros(b, k, device=device)
        run_scores[:, 1:] = NEG  # only beam 0 is live at first: all beams hold the same prompt
        run_tokens = torch.full((b, k, t), trie.eos_token_id, dtype=torch.long, device=device)
        return cls(
            active=torch.arange(b, device=device),
            run_tokens=run_tokens,
            run_scores=run_scores,
            nodes=trie.root(b, k),
            parent=torch.zeros(b, k, dtype=torch.long, device=device),
            fin_tokens=run_tokens.clone(),
            fin_scores=torch.full((b, k), NEG, device=device),
            fin_done=torch.zeros(b, k, dtype=torch.bool, device=device),
            improvable=torch.ones(b, 1, dtype=torch.bool, device=device),
            cache=cache,
            rows_mask=rows_mask,
            rows_seg=rows_seg,
            rows_pos=rows_pos,
            out_tokens=run_tokens.clone(),
            out_scores=torch.full((b, k), NEG, device=device),
        )

    def write_out(self, settled: torch.Tensor) -> None:
        """Copy the result slots of the ``settled`` ``(B',)`` prompts to the output."""
        self.out_tokens[self.active[settled]] = self.fin_tokens[settled]
        self.out_scores[self.active[settled]] = self.fin_scores[settled]

    def keep(self, stay: torch.Tensor) -> torch.Tensor:
        """Keep only the ``stay`` ``(B',)`` prompts; returns their old indices (``(B'',)``).

        The cache itself shrinks in the next step's reorder (`_ModelRunner.step`).
        """
        for name in ("active", "run_tokens", "run_scores", "nodes", "parent"):  # the running beams
            setattr(self, name, getattr(self, name)[stay])
        for name in ("fin_tokens", "fin_scores", "fin_done", "improvable"):  # the result slots
            setattr(self, name, getattr(self, name)[stay])
        kept = stay.nonzero().view(-1)
        rows = stay.repeat_interleave(self.run_scores.shape[1])
        sel = kept if isinstance(self.cache, SharedPromptCache) else rows  # rows_mask/seg: per prompt or beam
        self.rows_mask = self.rows_mask[sel] if self.rows_mask is not None else None
        self.rows_seg = self.rows_seg[sel] if self.rows_seg is not None else None
        self.rows_pos = self.rows_pos[rows]
        return kept


@dataclass
class _Candidates:
    """A step's top ``2K`` continuations per prompt (HF: _get_top_k_continuations' results)."""

    scores: torch.Tensor  # (B', 2K) sums of log-probs, best first
    parent: torch.Tensor  # (B', 2K) the running beam each one extends
    tokens: torch.Tensor  # (B', 2K, T) their answers so far, the new token included
    nodes: torch.Tensor  # (B', 2K) their trie nodes after the new token
    hits: torch.Tensor  # (B', 2K) bool: the answer ends here (HF's EOS and max-length criteria)


def _top_candidates(
    state: _BeamState, logits: torch.Tensor, norm, trie: TitleTrie, t: int, max_len: int, sparse: bool
) -> _Candidates:
    """a-b. The top ``2K`` continuations over all beams, restricted to the trie (HF:
    PrefixConstrainedLogitsProcessor, then _get_top_k_continuations)."""
    if sparse:
        top_scores, top_idx = sparse_top(logits, norm, state.nodes, state.run_scores, trie)
    else:
        top_scores, top_idx = dense_top(logits, state.nodes, state.run_scores, trie)
    v = trie.vocab_size
    parent, token = top_idx // v, top_idx % v
    tokens = torch.take_along_dim(state.run_tokens, parent[..., None], dim=1)  # (B', 2K, T)
    tokens[:, :, t] = token
    nodes = trie.advance(torch.take_along_dim(state.nodes, parent, dim=1), token)
    hits = (token == trie.eos_token_id) | (t + 1 >= max_len)
    return _Candidates(top_scores, parent, tokens, nodes, hits)


def _keep_running(state: _BeamState, cand: _Candidates) -> None:
    """c. The ``K`` best unfinished candidates keep running (HF: _get_running_beams_for_next_iteration)."""
    running = cand.scores + cand.hits.to(torch.float32) * NEG
    keep = torch.topk(running, k=state.run_scores.shape[1])[1]  # (B', K)
    state.run_tokens = torch.take_along_dim(cand.tokens, keep[..., None], dim=1)
    state.run_scores = torch.take_along_dim(running, keep, dim=1)
    state.nodes = torch.take_along_dim(cand.nodes, keep, dim=1)
    state.parent = torch.take_along_dim(cand.parent, keep, dim=1)


def _update_finished(
    state: _BeamState, cand: _Candidates, t: int, length_penalty: float, early_stopping: EarlyStopping
) -> None:
    """d. Merge the newly finished answers into the ``K`` result slots (HF: _update_finished_beams).

    Only the best ``K`` candidates may finish; none once a prompt's slots are full (``early_stopping``
    True) or no running beam can beat them (`improvable`, from the previous step).
    """
    k = state.fin_scores.shape[1]
    top_k = torch.arange(2 * k, device=cand.hits.device) < k  # (2K,)
    just_finished = cand.hits & top_k[None, :]
    finished = cand.scores / ((t + 1) ** length_penalty)
    full = torch.all(state.fin_done, dim=-1, keepdim=True) & (early_stopping is True)
    finished += full.to(torch.float32) * NEG
    finished += (~state.improvable).to(torch.float32) * NEG
    finished += (~just_finished) * NEG
    merged = torch.topk(torch.cat((state.fin_scores, finished), dim=1), k=k)[1]
    state.fin_tokens = torch.take_along_dim(
        torch.cat((state.fin_tokens, cand.tokens), dim=1), merged[..., None], dim=1
    )
    state.fin_scores = torch.take_along_dim(torch.cat((state.fin_scores, finished), dim=1), merged, dim=1)
    state.fin_done = torch.take_along_dim(torch.cat((state.fin_done, just_finished), dim=1), merged, dim=1)


def _check_early_stop(
    state: _BeamState,
    cand: _Candidates,
    t: int,
    max_len: int,
    length_penalty: float,
    early_stopping: EarlyStopping,
) -> bool:
    """e. Update `improvable` (can a running beam still beat the finished ones? HF:
    _check_early_stop_heuristic); returns whether any prompt searches on (HF:
    _beam_search_has_unfinished_sequences)."""
    hyp_len = max_len if (early_stopping == "never" and length_penalty > 0.0) else t + 1
    best_running = state.run_scores[:, :1] / (hyp_len**length_penalty)
    worst_finished = torch.where(state.fin_done, torch.min(state.fin_scores, dim=1, keepdim=True)[0], NEG)
    state.improvable = state.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
    return (
        bool(state.improvable.any())
        and not (bool(state.fin_done.all()) and early_stopping is True)
        and not bool(cand.hits.all())
    )


def _settled(state: _BeamState, early_stopping: EarlyStopping) -> torch.Tensor:
    """``(B',)`` prompts whose K result slots can no longer change, whatever the rest of the batch does.

    In HF a prompt stops accepting answers once all its slots are finished (``early_stopping=True``) or
    no running beam can beat them; every later candidate then carries a -1e9 penalty, so slots that hold
    real answers (scores far above -1e9) are final. Prompts with placeholder slots keep searching,
    exactly as in HF.
    """
    full = state.fin_done.all(-1)
    frozen = ~state.improvable[:, 0] | (full & (early_stopping is True))
    return frozen & full & (state.fin_scores.min(-1)[0] > NEG / 2)


class _ModelRunner:
    """The model side of the search: the prefill, and one decode step per beam with the cache layout of
    choice (the prompt's keys/values once per prompt, or copied to every beam)."""

    def __init__(self, model: nn.Module, num_beams: int, shared_prompt: bool, sparse: bool, head_chunk):
        self.model, self.k, self.shared_prompt, self.sparse = model, num_beams, shared_prompt, sparse
        self.head = LMHead(model, head_chunk)
        self.item = item_state(model) if shared_prompt else ({}, True)  # (slot -> kind, context_visible)

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        trie: TitleTrie,
        max_len: int,
    ) -> tuple[_BeamState, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Encode each prompt once; returns the start state and the first token's logits ``(B*K, V)``
        (and their normaliser if `sparse`), the same for the ``K`` beams of a prompt."""
        k = self.k
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = _prompt_positions(attention_mask)
        # HF drops an all-ones mask (no padding) before the prefill; do the same so the kernels match.
        mask = None if bool((attention_mask == 1).all()) else attention_mask
        inputs = dict(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, segment_ids=segment_ids
        )
        hidden, cache = _forward(self.model, None, **inputs)
        logits, norm = self.head(hidden, normalise=self.sparse)
        logits = logits.repeat_interleave(k, 0)  # (B*K, V)
        norm = tuple(x.repeat_interleave(k, 0) for x in norm) if self.sparse else None  # 2 x (B*K,)
        if self.shared_prompt:
            cache = SharedPromptCache(cache, capacity=max_len)
            rows_mask, rows_seg = mask, segment_ids  # (B', L): per prompt, for the attention bias
        else:
            cache.batch_repeat_interleave(k)
            rows_mask = mask.repeat_interleave(k, 0) if mask is not None else None  # (R, L)
            rows_seg = segment_ids.repeat_interleave(k, 0) if segment_ids is not None else None  # (R, L)
        rows_pos = positions[:, -1:].repeat_interleave(k, 0) + 1  # (R, 1) position of the first answer token
        state = _BeamState.start(trie, k, max_len, cache, rows_mask, rows_seg, rows_pos)
        return state, logits, norm

    def step(
        self, state: _BeamState, kept: torch.Tensor | None, t: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """g. Reorder (and shrink) the cache to the running beams, then feed each beam its token ``t``.

        `kept`: the old indices of the prompts that stay (None: all stayed). Returns the next logits
        ``(R, V)`` (and their normaliser if `sparse`).
        """
        if kept is None:
            kept_offset = torch.arange(state.active.numel(), device=state.active.device).view(-1, 1) * self.k
        else:
            kept_offset = kept.view(-1, 1) * self.k  # old row offsets of the prompts that stay
        beam_rows = (kept_offset + state.parent).view(-1)  # (R,) old cache row of each running beam
        step = dict(input_ids=state.run_tokens[:, :, t].reshape(-1, 1), position_ids=state.rows_pos + t)
        if self.shared_prompt:
            state.cache.select(kept, beam_rows)
            prompt = SharedPrompt(state.cache, self.k, state.rows_mask, state.rows_seg, *self.item, t + 1)
            # segment_ids only switch the stacked passes on; the kinds' masks come from `prompt`
            with decode_attention(self.model):
                hidden, state.cache = _forward(
                    self.model, state.cache, segment_ids=state.rows_seg, iam_prompt=prompt, **step
                )
        else:
            state.cache.reorder_cache(beam_rows)
            step_mask = None
            if state.rows_mask is not None:
                ones = state.rows_mask.new_ones(state.rows_mask.shape[0], t + 1)
                step_mask = torch.cat([state.rows_mask, ones], dim=1)
            hidden, state.cache = _forward(
                self.model, state.cache, attention_mask=step_mask, segment_ids=state.rows_seg, **step
            )
        return self.head(hidden, normalise=self.sparse)


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
        sparse: score only the trie's allowed tokens (`scoring.sparse_top`; speed only); False scores the
            whole vocabulary as HF does (`scoring.dense_top`).
        head_chunk: vocabulary rows per slice of the LM head product on CPU (`scoring.LMHead`; speed
            only); None: one product.
    """
    check_search(model, trie, num_beams, early_stopping)
    if trie.child_ptr.device != input_ids.device:
        trie.to(input_ids.device)
    max_len = max_new_tokens or trie.max_depth  # T
    runner = _ModelRunner(model, num_beams, shared_prompt, sparse, head_chunk)
    state, logits, norm = runner.prefill(input_ids, attention_mask, segment_ids, trie, max_len)
    steps = 0
    for t in range(max_len):
        cand = _top_candidates(state, logits, norm, trie, t, max_len, sparse)  # a-b
        _keep_running(state, cand)  # c
        _update_finished(state, cand, t, length_penalty, early_stopping)  # d
        go_on = _check_early_stop(state, cand, t, max_len, length_penalty, early_stopping)  # e
        # f. write out the prompts that are settled (all of them at the end); the rest search on
        if not go_on or t + 1 == max_len:
            settled = torch.ones_like(state.active, dtype=torch.bool)
        else:
            settled = _settled(state, early_stopping) if drop_settled else None
        kept = None
        if settled is not None and bool(settled.any()):
            state.write_out(settled)
            if bool(settled.all()):
                break
            kept = state.keep(~settled)
        logits, norm = runner.step(state, kept, t)  # g
        steps += 1
    return beam_result(trie, state.out_tokens, state.out_scores, steps)
