"""Prompt text -> token ids and segment ids, built piecewise from tokens pre-computed once per item.

Why piecewise, and why "in context"
-----------------------------------
Segment ids need exact token boundaries between items, so a prompt is the concatenation of per-piece
token lists: head (BOS + instruction + history prefix), one piece per history item, the response
header, the answer (+ EOS). But byte-level BPE tokenizes a piece differently alone and inside a prompt:
SmolLM2 turns ``"Toy Story (1995)"`` alone into ``" T oy ĠStory ...`` and, after ``History:``, into
``Ġ" T oy ĠStory ...``. So every piece is tokenized **in a fixed left context** (an *anchor*): we
tokenize ``anchor + piece`` and strip the anchor's tokens, after checking they are an exact prefix
(otherwise the tokenizer merged across the boundary, and we try the fallback anchors below, with a
warning, then raise).

Anchors (``PLACEHOLDER_TITLE`` stands in for "some other item"):

    piece                     anchor (the text really before it, trailing spaces removed)
    head                      ""  (start of the string)
    first history item        instruction + history prefix
    later history item        item_format(placeholder) + separator
    response header           item_format(placeholder)       (or the head, when the history is empty)
    answer                    item_format(placeholder) + response header
    fallbacks, in order       "\\n", "x"

With ``boundary_whitespace="next"`` the trailing spaces of a piece are moved to the start of the next
one (``", "`` ends an item with ``,`` and the next item starts with ``Ġ"``), so for the default template
and byte-level BPE the concatenation equals the tokenization of the whole prompt string (tested).

The answer tokens come from one function, `encode_answer` (`encode_answers` for a catalogue): the
`PromptEncoder` builds the training labels from them and hands the same lists to the decoding trie
(`IAMDataModule.answer_token_ids`), so the labels and the tokens constrained decoding forces are the same
ids by construction.

Each catalogue item is tokenized once per position kind (first/later x with/without separator), and a
sample is assembled by list concatenation, so encoding ~100k samples takes a second or two.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from transformers import PreTrainedTokenizerBase

from iamrec.data.prompt import PLACEHOLDER_TITLE, PromptTemplate
from iamrec.segments import CONTEXT, TARGET

FALLBACK_ANCHORS: tuple[str, ...] = ("\n", "x")


class TokenizationError(ValueError):
    """A prompt piece cannot be tokenized separately from its neighbours."""


class SequenceTooLongError(ValueError):
    """A sample does not fit `max_length` even with no history items."""


class TitleTokenError(ValueError):
    """A catalogue title whose tokens include a special token of the tokenizer (the model cannot say it)."""


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids of the tokenizer's special tokens: BOS, EOS, pad, unk, the additional and added special ones."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def check_titles_sayable(tokenizer: PreTrainedTokenizerBase, titles: Sequence[str], where: str) -> None:
    """Refuse (`TitleTokenError`, one sentence naming the item id, its title and the token) a title whose
    tokens include a special token: the tokenizer turns such text (``</s>``, ``<|im_end|>`` ...) into the
    special token itself, so the answer would hold an EOS or a control token that decoding cannot give
    back as part of a title. `where` names the catalogue (items.parquet)."""
    special = special_token_ids(tokenizer)
    if not special or not titles:
        return
    for item_id, ids in enumerate(_ids(tokenizer, list(titles))):
        hit = next((t for t in ids if t in special), None)
        if hit is not None:
            token = tokenizer.convert_ids_to_tokens(hit)
            raise TitleTokenError(
                f"{where}: item {item_id} has the title {titles[item_id]!r}, whose tokens include the "
                f"tokenizer's special token {token!r}, so the model could never say that title; rewrite or "
                "drop it and re-run the data prep."
            )


def _split_trailing_spaces(text: str) -> tuple[str, str]:
    core = text.rstrip(" ")
    return core, text[len(core) :]


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def tokenize_in_context(
    tokenizer: PreTrainedTokenizerBase, anchor: str, pieces: Sequence[str], what: str = "piece"
) -> list[list[int]]:
    """Token ids of each piece as the tokenizer produces them right after the text `anchor`.

    Tokenizes ``anchor + piece`` and strips the anchor's own tokens, which must be an exact prefix. A
    piece for which they are not (the tokenizer merged across the boundary) is retried after each of
    `FALLBACK_ANCHORS` with a warning; if none works a `TokenizationError` names the piece.
    """
    out: list[list[int] | None] = [[] if p == "" else None for p in pieces]
    todo = [i for i, p in enumerate(pieces) if p != ""]
    anchors = [anchor] + [a for a in FALLBACK_ANCHORS if a != anchor]
    for k, a in enumerate(anchors):
        if not todo:
            break
        a_ids = _ids(tokenizer, [a])[0] if a else []
        still = []
        for i, ids in zip(todo, _ids(tokenizer, [a + pieces[i] for i in todo])):
            if ids[: len(a_ids)] == a_ids and len(ids) > len(a_ids):
                out[i] = ids[len(a_ids) :]
            else:
                still.append(i)
        if still and k < len(anchors) - 1:
            warnings.warn(
                f"{len(still)} {what}(s) (e.g. {pieces[still[0]]!r}) merge with the text before them "
                f"({a!r}) under this tokenizer; tokenizing them after {anchors[k + 1]!r} instead, so their "
                "tokens differ from a whole-prompt tokenization (training and decoding still agree).",
                stacklevel=2,
            )
        todo = still
    if todo:
        raise TokenizationError(
            f"Cannot tokenize the {what} {pieces[todo[0]]!r} separately from the text before it with this "
            "tokenizer; change the prompt template (e.g. put a space or newline before it)."
        )
    return out  # type: ignore[return-value]


def _encode_pieces(
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    prev_text: str,
    texts: Sequence[str],
    what: str,
    keep_trailing: bool = False,
) -> list[list[int]]:
    """Tokens of pieces `texts` that follow the text `prev_text`, honouring `boundary_whitespace`."""
    anchor, lead = _split_trailing_spaces(prev_text)
    if template.boundary_whitespace == "next":
        # Spaces the previous piece gave away start this piece; this piece gives its own away.
        pieces = [lead + (t if keep_trailing else _split_trailing_spaces(t)[0]) for t in texts]
        return tokenize_in_context(tokenizer, anchor, pieces, what)
    # "previous": a piece keeps its trailing spaces, tokenized on their own after its text.
    split = [(t, "") if keep_trailing else _split_trailing_spaces(t) for t in texts]
    cores = tokenize_in_context(tokenizer, anchor, [c for c, _ in split], what)
    trail_ids = {s: _ids(tokenizer, [s])[0] if s else [] for s in {s for _, s in split}}
    return [c + trail_ids[s] for c, (_, s) in zip(cores, split)]


def encode_answers(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, titles: Sequence[str]
) -> list[list[int]]:
    """`encode_answer` for many titles in one tokenizer call."""
    if tokenizer.eos_token_id is None:
        raise TokenizationError("The tokenizer has no eos token; the answer needs one to end.")
    prev = template.item_text(PLACEHOLDER_TITLE, last=True) + template.response_header
    texts = [template.answer_text(t) for t in titles]
    answers = _encode_pieces(tokenizer, template, prev, texts, "answer", keep_trailing=True)
    return [a + [tokenizer.eos_token_id] for a in answers]


def encode_answer(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, title: str) -> list[int]:
    """The answer's token ids as they follow the response header, plus EOS (`encode_answers` of one title).

    The training labels and the decoding trie both use `PromptEncoder.answer_ids`, built by
    `encode_answers`, so decoding forces exactly the ids the model was trained on.
    """
    return encode_answers(tokenizer, template, [title])[0]


@dataclass
class EncodedSample:
    """One sample's tokens; `input_ids[:prompt_length]` is the prompt, the rest the answer + EOS."""

    input_ids: list[int]
    segment_ids: list[int]
    prompt_length: int
    num_items: int


class PromptEncoder:
    """Pre-tokenizes a catalogue once; encodes (history, target) samples by concatenation.

    Args:
        tokenizer: Any HF tokenizer with an eos token (BOS optional).
        template: The prompt template.
        titles: Item titles, indexed by item id.
        max_items: Keep at most this many most recent history items (None: no cap).
        max_length: Longest allowed sequence, prompt + answer + EOS, in tokens. Whole oldest items are
            dropped until a sample fits.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: PromptTemplate,
        titles: Sequence[str],
        max_items: int | None = 10,
        max_length: int = 512,
    ) -> None:
        if max_items is not None and max_items < 0:
            raise ValueError(f"max_items must be >= 0 or None, got {max_items}.")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}.")
        self.template, self.max_items, self.max_length = template, max_items, max_length
        self.titles = list(titles)
        bos = tokenizer.bos_token_id if template.add_bos else None
        t = template
        head = _encode_pieces(tokenizer, t, "", [t.head], "prompt head")[0]
        self.head_ids: list[int] = ([bos] if bos is not None else []) + head
        later_prev = t.item_text(PLACEHOLDER_TITLE, last=False)
        # item_ids[(first, last)][item]: history-item tokens by position kind.
        self.item_ids: dict[tuple[bool, bool], list[list[int]]] = {}
        for first in (True, False):
            prev = t.head if first else later_prev
            for last in (True, False):
                texts = [t.item_text(title, last) for title in self.titles]
                self.item_ids[(first, last)] = _encode_pieces(tokenizer, t, prev, texts, "history item")
        self._item_len = {k: [len(x) for x in v] for k, v in self.item_ids.items()}
        # header_ids[has_items]
        self.header_ids: dict[bool, list[int]] = {
            has: _encode_pieces(
                tokenizer,
                t,
                t.item_text(PLACEHOLDER_TITLE, True) if has else t.head,
                [t.response_header],
                "header",
            )[0]
            for has in (True, False)
        }
        self.answer_ids: list[list[int]] = encode_answers(tokenizer, t, self.titles)
        if self.titles:
            longest = max(range(len(self.titles)), key=lambda i: len(self.answer_ids[i]))
            self._check_fits(self._length([], longest), longest)

    # --- truncation ----------------------------------------------------------------------------------
    def _length(self, history: Sequence[int], target: int) -> int:
        n = len(history)
        total = len(self.head_ids) + len(self.header_ids[n > 0]) + len(self.answer_ids[target])
        if n == 1:
            total += self._item_len[(True, True)][history[0]]
        elif n > 1:
            mid = self._item_len[(False, False)]
            total += self._item_len[(True, False)][history[0]] + self._item_len[(False, True)][history[-1]]
            total += sum(mid[i] for i in history[1:-1])
        return total

    def _check_fits(self, total: int, target: int) -> None:
        if total > self.max_length:
            raise SequenceTooLongError(
                f"max_length={self.max_length} is too short: with no history items, the prompt plus the "
                f"answer {self.titles[target]!r} already needs {total} tokens; raise max_length."
            )

    def keep(self, history: Sequence[int], target: int) -> list[int]:
        """The most recent history items that fit both `max_items` and `max_length` (whole items only)."""
        hist = list(history)
        if self.max_items is not None:
            hist = hist[len(hist) - self.max_items :] if self.max_items > 0 else []
        n = len(hist)
        if n == 0 or self._length(hist, target) <= self.max_length:
            if n == 0:
                self._check_fits(self._length(hist, target), target)
            return hist
        # Drop whole oldest items: the total with items s..n-1 kept, for s = 1, 2, ... (O(n) overall).
        mid = self._item_len[(False, False)]
        fixed = len(self.head_ids) + len(self.answer_ids[target])
        suffix = list(accumulate(mid[i] for i in reversed(hist[:-1])))[::-1] + [0]  # sum(mid[hist[j:n-1]])
        last_len = self._item_len[(False, True)][hist[-1]]
        for s in range(1, n):
            if n - s == 1:
                items = self._item_len[(True, True)][hist[-1]]
            else:
                items = self._item_len[(True, False)][hist[s]] + suffix[s + 1] + last_len
            if fixed + len(self.header_ids[True]) + items <= self.max_length:
                return hist[s:]
        self._check_fits(self._length([], target), target)
        return []

    def length(self, history: Sequence[int], target: int) -> int:
        """Token count of the encoded sample (after truncation), without building it."""
        return self._length(self.keep(history, target), target)

    # --- assembly ------------------------------------------------------------------------------------
    def encode(self, history: Sequence[int], target: int) -> EncodedSample:
        """Tokens and segment ids of one sample: CONTEXT head, items 1..n (oldest kept = 1), CONTEXT
        header, TARGET answer + EOS."""
        kept = self.keep(history, target)
        n = len(kept)
        ids = list(self.head_ids)
        seg = [CONTEXT] * len(ids)
        for k, item in enumerate(kept):
            piece = self.item_ids[(k == 0, k == n - 1)][item]
            ids += piece
            seg += [k + 1] * len(piece)
        header = self.header_ids[n > 0]
        ids += header
        seg += [CONTEXT] * len(header)
        prompt_length = len(ids)
        answer = self.answer_ids[target]
        ids += answer
        seg += [TARGET] * len(answer)
        return EncodedSample(ids, seg, prompt_length, n)
