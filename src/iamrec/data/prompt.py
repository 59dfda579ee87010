"""The prompt template: how a history and a target are written as text.

With the defaults a sample reads (``<s>`` = the tokenizer's BOS, ``</s>`` = its EOS)::

    <s>Below is a user's history of items, oldest first. Predict the next item.
    History: "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)"
    ### Response:
    Copycat (1995)</s>

and its segments are::

    CONTEXT  <s>Below is ... next item.\\nHistory:
    1         "Toy Story (1995)",          <- quotes and separator belong to the item
    2         "GoldenEye (1995)",
    3         "Four Rooms (1995)"
    CONTEXT  \\n### Response:\\n
    TARGET   Copycat (1995)</s>

Where the space between two pieces goes is `boundary_whitespace` (see `PromptTemplate`): by default it
starts the *next* piece, because byte-level BPE (SmolLM2, Qwen, Llama-3) merges a space with the quote or
word after it (`Ġ"`), so this is the only split under which every token is one the tokenizer itself
produces for the whole prompt.

This module is text only; `encoding.py` turns it into token ids.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Stands in for "some title" where a piece's left context is another item (see encoding.py).
PLACEHOLDER_TITLE = "Item"


class PromptTemplateError(ValueError):
    """A prompt template field is invalid; the message names the field."""


def _check_title_format(name: str, fmt: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError as err:
        raise PromptTemplateError(f"template.{name} '{fmt}' is not a valid format string: {err}.") from None
    if fields != ["title"]:
        raise PromptTemplateError(
            f"template.{name} '{fmt}' must contain the field {{title}} exactly once and no other field "
            "(write literal braces as {{ and }})."
        )


@dataclass(frozen=True)
class PromptTemplate:
    """How a user's history and the target item are written as text.

    Args:
        instruction: Text right after BOS, before the history (segment CONTEXT).
        history_prefix: Text between the instruction and the first item (segment CONTEXT).
        item_format: How one history item is written; must contain ``{title}`` once. Its quotes belong
            to the item's segment.
        item_separator: Written after every history item but the last; belongs to that item's segment.
        response_header: Text after the last item, before the answer (segment CONTEXT); the prompt
            used for generation ends with it.
        answer_format: How the target is written as the answer; must contain ``{title}`` once. The answer
            and the EOS after it are the TARGET segment, the only tokens with a loss.
        add_bos: Start the prompt with the tokenizer's BOS token (skipped when the tokenizer has none).
        boundary_whitespace: Where spaces at the end of a piece (e.g. the space of ``", "``) go.
            ``next`` (default): to the start of the following piece, which is where byte-level BPE puts
            them (``Ġ"``), so the pieces' tokens equal the tokens of the whole prompt. ``previous``: they
            stay in their own piece as separate tokens (the literal text split, tokens a pretrained
            model rarely sees).
    """

    instruction: str = "Below is a user's history of items, oldest first. Predict the next item.\n"
    history_prefix: str = "History: "
    item_format: str = '"{title}"'
    item_separator: str = ", "
    response_header: str = "\n### Response:\n"
    answer_format: str = "{title}"
    add_bos: bool = True
    boundary_whitespace: Literal["next", "previous"] = "next"

    def __post_init__(self) -> None:
        for name in ("instruction", "history_prefix", "item_separator", "response_header"):
            if not isinstance(getattr(self, name), str):
                raise PromptTemplateError(f"template.{name} must be a string, got {getattr(self, name)!r}.")
        _check_title_format("item_format", self.item_format)
        _check_title_format("answer_format", self.answer_format)
        if not self.response_header.strip():
            raise PromptTemplateError(
                "template.response_header must contain visible text: it marks where the answer starts."
            )
        if self.boundary_whitespace not in ("next", "previous"):
            raise PromptTemplateError(
                f"template.boundary_whitespace must be 'next' or 'previous', got '{self.boundary_whitespace}'."
            )

    # --- text of each piece -------------------------------------------------------------------------
    @property
    def head(self) -> str:
        """The CONTEXT text before the first item (BOS not included)."""
        return self.instruction + self.history_prefix

    def item_text(self, title: str, last: bool) -> str:
        """One history item as text: formatted title, plus the separator unless it is the last item."""
        return self.item_format.format(title=title) + ("" if last else self.item_separator)

    def answer_text(self, title: str) -> str:
        """The answer text for `title` (EOS not included)."""
        return self.answer_format.format(title=title)

    def render(self, history_titles: Sequence[str], target_title: str | None = None) -> tuple[str, str]:
        """The whole prompt and the answer as plain text (no special tokens); a reference for tests."""
        items = [self.item_text(t, last=i == len(history_titles) - 1) for i, t in enumerate(history_titles)]
        prompt = self.head + "".join(items) + self.response_header
        return prompt, "" if target_title is None else self.answer_text(target_title)
