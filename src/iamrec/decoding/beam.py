"""Trie-constrained beam search over the whole catalogue, fast: `constrained_beam_search`.

Notation: ``B`` prompts, ``L`` padded prompt length, ``K`` beams, ``V`` vocabulary, ``T`` the most
answer tokens (EOS included), ``B'`` prompts still searching, ``R = B' * K`` their model rows.

It returns the ``K`` best catalogue answers per prompt with HF's scores, the same beams as
`reference_beam_search` (HF ``generate``; the tests check it): it mirrors transformers v5
``GenerationMixin._beam_search`` (top ``2K`` candidates, finished hypotheses merged by score,
``early_stopping``, ``length_penalty``). The loop reads as HF's steps, one helper each, on one
`BeamState` (HF's tensors minus the prompt columns, plus the decode cache and its prompt rows); steps
a-f live in `iamrec.decoding.steps`:

    a-b  `top_candidates`      the top 2K trie-allowed continuations (HF: _get_top_k_continuations)
    c    `keep_running`        the K best unfinished ones run on (_get_running_beams_for_next_iteration)
    d    `update_finished`     finished answers merged into the K result slots (_update_finished_beams)
    e    `check_early_stop`    can a running beam still beat them? (_check_early_stop_heuristic)
    f    `settled`, `BeamState.write_out` / `keep`: settled prompts written out and dropped
    g    `_ModelRunner.step`   reorder the cache to the running beams, one token per beam

A step reads the device once (`steps.step_flags`: does any prompt search on, which settled); with
``table=True`` (the default) nothing else in a step waits for the device.

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
* **log-probs of the allowed tokens only** (`scoring.table_top`): ``TitleTrie.next_tokens`` gives the
  allowed tokens of all ``R`` beams at once as a fixed ``(R, C)`` block of a padded table (no Python call
  per beam that walks a dict, as ``prefix_allowed_tokens_fn`` does, and no host sync), and only those
  pairs get a log-prob; no vocabulary-wide log-softmax, mask or sum (``table=False``: the pairs from
  ``TitleTrie.allowed_edges``, `scoring.sparse_top`; ``sparse=False`` runs HF's way, `scoring.dense_top`);
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
from typing import Any

import torch
from torch import nn

import iamrec.decoding.steps as steps
from iamrec.attention import base_model
from iamrec.decoding.result import BeamResult, EarlyStopping, beam_result, check_search
from iamrec.decoding.scoring import LMHead
from iamrec.decoding.shared_prompt import SharedPrompt, SharedPromptCache, decode_attention, item_state
from iamrec.decoding.steps import BeamState
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
    ) -> tuple[BeamState, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
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
        state = BeamState.start(trie, k, max_len, cache, rows_mask, rows_seg, rows_pos)
        return state, logits, norm

    def step(
        self, state: BeamState, kept: torch.Tensor | None, t: int
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
    table: bool = True,
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
        table: with `sparse`, list the allowed tokens from the trie's padded next-token table
            (`scoring.table_top`: a fixed block, no host sync; speed only); False: from its edge list
            (`scoring.sparse_top`, `TitleTrie.allowed_edges`, the earlier path, kept as its reference).
        head_chunk: vocabulary rows per slice of the LM head product on CPU (`scoring.LMHead`; speed
            only); None: one product.
    """
    check_search(model, trie, num_beams, early_stopping)
    if trie.child_ptr.device != input_ids.device:
        trie.to(input_ids.device)
    max_len = max_new_tokens or trie.max_depth  # T
    runner = _ModelRunner(model, num_beams, shared_prompt, sparse, head_chunk)
    state, logits, norm = runner.prefill(input_ids, attention_mask, segment_ids, trie, max_len)
    n_steps = 0
    for t in range(max_len):
        cand = steps.top_candidates(state, logits, norm, trie, t, max_len, sparse, table)  # a-b
        steps.keep_running(state, cand)  # c
        steps.update_finished(state, cand, t, length_penalty, early_stopping)  # d
        go_on = steps.check_early_stop(state, cand, t, max_len, length_penalty, early_stopping)  # e
        # f. write out the prompts that are settled (all of them at the end); the rest search on
        last = t + 1 == max_len
        settled = steps.settled(state, early_stopping) if drop_settled and not last else None
        go_on, done = steps.step_flags(go_on, settled)  # the step's one read from the device
        if not go_on or last:
            done = list(range(state.active.numel()))
        kept = None
        if done:
            device = state.active.device
            state.write_out(torch.tensor(done, device=device))
            if len(done) == state.active.numel():
                break
            kept = torch.tensor(sorted(set(range(state.active.numel())) - set(done)), device=device)
            state.keep(kept)
        logits, norm = runner.step(state, kept, t)  # g
        n_steps += 1
    return beam_result(trie, state.out_tokens, state.out_scores, n_steps)
