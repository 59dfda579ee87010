"""The reference path: HF ``generate`` with a ``prefix_allowed_tokens_fn`` over the catalogue's answers.

`reference_beam_search` is the simple, slow way to the same beams as `constrained_beam_search` (the tests
and `benchmarks/bench_decoding.py` compare the two). Settings under which the two paths are identical
(`beam_generation_config` builds them for HF): greedy beams (``do_sample=False``),
``num_return_sequences = num_beams``, ``max_new_tokens`` = the longest answer (``trie.max_depth``),
``eos_token_id`` = the answers' EOS and no other logits processor (the model's own ``generation_config``
is swapped out during the reference call, so its defaults cannot leak in). Defaults
``length_penalty=0.0`` (scores are plain sums of log-probs; HF divides by ``length ** length_penalty``,
so 0 means no normalisation) and ``early_stopping=True`` (a prompt stops as soon as it has ``K`` finished
answers — with ``length_penalty=0`` a running beam's score only falls, so it stops when no running beam
can beat the finished ones). Other values are mirrored too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import GenerationConfig

from iamrec.attention import base_model
from iamrec.decoding.result import BeamResult, EarlyStopping, beam_result, check_search
from iamrec.decoding.trie import TitleTrie


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
    hf = base_model(model)
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
    check_search(model, trie, num_beams, early_stopping)
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
    return beam_result(trie, tokens, out.sequences_scores.view(b, num_beams), tokens.shape[-1])
