"""Constrained decoding over the catalogue: a title trie and batched beam search (DESIGN.md §1).

trie.py   TitleTrie: answers (title tokens + EOS) as CSR tensors; vectorised allowed-token masks
beam.py   constrained_beam_search (fast path) and reference_beam_search (HF generate), equal beams
shared_prompt.py   the fast path's decode cache: prompt keys/values once per prompt, answers per beam
"""

from iamrec.decoding.beam import (
    BeamResult,
    beam_generation_config,
    constrained_beam_search,
    prefix_table,
    reference_beam_search,
)
from iamrec.decoding.trie import TitleTrie

__all__ = [
    "BeamResult",
    "TitleTrie",
    "beam_generation_config",
    "constrained_beam_search",
    "prefix_table",
    "reference_beam_search",
]
