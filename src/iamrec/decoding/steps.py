"""HF beam search's bookkeeping for `constrained_beam_search` (steps a-f of `iamrec.decoding.beam`).

Notation: ``B`` prompts, ``K`` beams, ``V`` vocabulary, ``T`` the most answer tokens (EOS included),
``B'`` prompts still searching, ``R = B' * K`` their model rows.

Every function works on whole tensors and reads nothing from the device: the search loop reads one small
tensor per step (`step_flags`: does any prompt search on, which prompts settled), and shrinks the state
with index tensors built from that read (`BeamState.write_out`, `BeamState.keep`), not boolean masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from iamrec.decoding.result import EarlyStopping
from iamrec.decoding.scoring import NEG, dense_top, sparse_top, table_top
from iamrec.decoding.shared_prompt import SharedPromptCache
from iamrec.decoding.trie import TitleTrie


@dataclass
class BeamState:
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
    ) -> BeamState:
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
        """Copy the result slots of the ``settled`` prompts (``(S,)`` indices into ``B'``) to the output."""
        where = self.active.index_select(0, settled)
        self.out_tokens.index_copy_(0, where, self.fin_tokens.index_select(0, settled))
        self.out_scores.index_copy_(0, where, self.fin_scores.index_select(0, settled))

    def keep(self, kept: torch.Tensor) -> None:
        """Keep only the ``kept`` prompts (``(B'',)`` indices into ``B'``, ascending).

        The cache itself shrinks in the next step's reorder (`beam._ModelRunner.step`).
        """
        k = self.run_scores.shape[1]
        for name in ("active", "run_tokens", "run_scores", "nodes", "parent"):  # the running beams
            setattr(self, name, getattr(self, name).index_select(0, kept))
        for name in ("fin_tokens", "fin_scores", "fin_done", "improvable"):  # the result slots
            setattr(self, name, getattr(self, name).index_select(0, kept))
        rows = (kept[:, None] * k + torch.arange(k, device=kept.device)).view(-1)  # their beam rows
        sel = kept if isinstance(self.cache, SharedPromptCache) else rows  # rows_mask/seg: per prompt or beam
        self.rows_mask = self.rows_mask.index_select(0, sel) if self.rows_mask is not None else None
        self.rows_seg = self.rows_seg.index_select(0, sel) if self.rows_seg is not None else None
        self.rows_pos = self.rows_pos.index_select(0, rows)


@dataclass
class Candidates:
    """A step's top ``2K`` continuations per prompt (HF: _get_top_k_continuations' results)."""

    scores: torch.Tensor  # (B', 2K) sums of log-probs, best first
    parent: torch.Tensor  # (B', 2K) the running beam each one extends
    tokens: torch.Tensor  # (B', 2K, T) their answers so far, the new token included
    nodes: torch.Tensor  # (B', 2K) their trie nodes after the new token
    hits: torch.Tensor  # (B', 2K) bool: the answer ends here (HF's EOS and max-length criteria)


def top_candidates(
    state: BeamState,
    logits: torch.Tensor,
    norm,
    trie: TitleTrie,
    t: int,
    max_len: int,
    sparse: bool,
    table: bool,
) -> Candidates:
    """a-b. The top ``2K`` continuations over all beams, restricted to the trie (HF:
    PrefixConstrainedLogitsProcessor, then _get_top_k_continuations). `table`: the allowed tokens from the
    trie's padded table (`scoring.table_top`, no host sync), else from its edge list (`scoring.sparse_top`)."""
    if sparse and table:
        top_scores, top_idx = table_top(logits, norm, state.nodes, state.run_scores, trie)
    elif sparse:
        top_scores, top_idx = sparse_top(logits, norm, state.nodes, state.run_scores, trie)
    else:
        top_scores, top_idx = dense_top(logits, state.nodes, state.run_scores, trie)
    v = trie.vocab_size
    parent, token = top_idx // v, top_idx % v
    tokens = torch.take_along_dim(state.run_tokens, parent[..., None], dim=1)  # (B', 2K, T)
    tokens[:, :, t] = token
    nodes = trie.advance(torch.take_along_dim(state.nodes, parent, dim=1), token)
    hits = (token == trie.eos_token_id) | (t + 1 >= max_len)
    return Candidates(top_scores, parent, tokens, nodes, hits)


def keep_running(state: BeamState, cand: Candidates) -> None:
    """c. The ``K`` best unfinished candidates keep running (HF: _get_running_beams_for_next_iteration)."""
    running = cand.scores + cand.hits.to(torch.float32) * NEG
    keep = torch.topk(running, k=state.run_scores.shape[1])[1]  # (B', K)
    state.run_tokens = torch.take_along_dim(cand.tokens, keep[..., None], dim=1)
    state.run_scores = torch.take_along_dim(running, keep, dim=1)
    state.nodes = torch.take_along_dim(cand.nodes, keep, dim=1)
    state.parent = torch.take_along_dim(cand.parent, keep, dim=1)


def update_finished(
    state: BeamState, cand: Candidates, t: int, length_penalty: float, early_stopping: EarlyStopping
) -> None:
    """d. Merge the newly finished answers into the ``K`` result slots (HF: update_finished_beams).

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


def check_early_stop(
    state: BeamState,
    cand: Candidates,
    t: int,
    max_len: int,
    length_penalty: float,
    early_stopping: EarlyStopping,
) -> torch.Tensor:
    """e. Update `improvable` (can a running beam still beat the finished ones? HF:
    _check_early_stop_heuristic); returns whether any prompt searches on (HF:
    _beam_search_has_unfinished_sequences), a 0-dim bool tensor (read with `step_flags`)."""
    hyp_len = max_len if (early_stopping == "never" and length_penalty > 0.0) else t + 1
    best_running = state.run_scores[:, :1] / (hyp_len**length_penalty)
    worst_finished = torch.where(state.fin_done, torch.min(state.fin_scores, dim=1, keepdim=True)[0], NEG)
    state.improvable = state.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
    go_on = state.improvable.any() & ~cand.hits.all()
    if early_stopping is True:
        go_on = go_on & ~state.fin_done.all()
    return go_on


def step_flags(go_on: torch.Tensor, settled: torch.Tensor | None) -> tuple[bool, list[int]]:
    """The step's one read from the device: ``(any prompt searches on, the settled prompts' indices)``."""
    flags = go_on.view(1) if settled is None else torch.cat([go_on.view(1), settled])
    values = flags.tolist()
    return bool(values[0]), [i for i, x in enumerate(values[1:]) if x]


def settled(state: BeamState, early_stopping: EarlyStopping) -> torch.Tensor:
    """``(B',)`` prompts whose K result slots can no longer change, whatever the rest of the batch does.

    In HF a prompt stops accepting answers once all its slots are finished (``early_stopping=True``) or
    no running beam can beat them; every later candidate then carries a -1e9 penalty, so slots that hold
    real answers (scores far above -1e9) are final. Prompts with placeholder slots keep searching,
    exactly as in HF.
    """
    full = state.fin_done.all(-1)
    frozen = ~state.improvable[:, 0] | (full & (early_stopping is True))
    return frozen & full & (state.fin_scores.min(-1)[0] > NEG / 2)
