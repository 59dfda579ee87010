"""Constrained decoding over the catalogue: a title trie and batched beam search, fast and reference.

trie.py            TitleTrie: answers (title tokens + EOS) as CSR tensors; vectorised allowed tokens
beam.py            constrained_beam_search, the fast path: the model side and the search loop
steps.py           the fast path's bookkeeping: HF's beam search steps on one beam state, no host sync
scoring.py         the fast path's step scoring: LM head, top 2K trie-allowed continuations
shared_prompt.py   the fast path's decode cache: prompt keys/values once per prompt, answers per beam
reference.py       reference_beam_search: HF generate + prefix_allowed_tokens_fn, the same beams
result.py          BeamResult, what both return
ranking.py         search + top_recommendations: a batch's beams as Recommendations (item id, title, score)
"""

from iamrec.decoding.beam import constrained_beam_search
from iamrec.decoding.ranking import Recommendation, search, top_recommendations
from iamrec.decoding.reference import beam_generation_config, prefix_table, reference_beam_search
from iamrec.decoding.result import BeamResult
from iamrec.decoding.trie import TitleTrie

__all__ = [
    "BeamResult",
    "Recommendation",
    "TitleTrie",
    "beam_generation_config",
    "constrained_beam_search",
    "prefix_table",
    "reference_beam_search",
    "search",
    "top_recommendations",
]
