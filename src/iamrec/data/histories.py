"""Histories given by a user (a JSONL file or a Python list) -> item ids -> prompts, as training wrote them.

A history is a list whose elements are item titles (strings, as in items.parquet up to surrounding spaces
and Unicode normalisation: a title typed in decomposed form, "e" + U+0301, finds the catalogue's "é"; both
sides are compared in NFC) or item ids (integers, Python's or numpy's: the ``item_id`` of items.parquet),
oldest first; both may be mixed. The histories file of
``iamrec predict --data.predict_file FILE`` is JSONL, one object per line::

    {"history": ["Toy Story (1995)", "Heat (1995)"]}
    {"user": "alice", "history": [0, 49]}

``user`` (optional, any JSON string or number) is echoed back with the line's recommendations. An object
holding the same key twice is refused (which one would count is ambiguous). Blank lines are skipped; line numbers count every line of the file from 1. A line that is not such an object,
or that names an item the catalogue lacks, is one `HistoryLineError` (its line number and one sentence);
the other lines are still used.

Prompts: `encode_history` builds the prompt with the `PromptEncoder` training used (same template, same
tokens, same segment ids, the most recent ``max_items`` items). Training drops whole oldest items until
prompt + answer fit ``max_length``; with no answer known, the catalogue's longest answer stands in, so a
kept history leaves room for any answer (on ML-100K with ``max_length`` 256 nothing is ever dropped).
"""

from __future__ import annotations

import difflib
import json
import numbers
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from iamrec.data.encoding import PromptEncoder

# How many catalogue titles an unknown title's error suggests.
CLOSE_MATCHES = 3
# The Unicode normal form titles are compared in (data prep writes titles in it too: stats.json's
# "title_normalization").
TITLE_NORMALIZATION = "NFC"


def normalize_title(title: str) -> str:
    """`title` stripped of surrounding spaces, in `TITLE_NORMALIZATION`."""
    return unicodedata.normalize(TITLE_NORMALIZATION, title.strip())


class UnknownItemError(ValueError):
    """A history names an item the catalogue lacks (the message names it and the closest titles)."""


class HistoryFileError(ValueError):
    """A histories file that cannot be used at all (missing, unreadable, or no usable line)."""


@dataclass(frozen=True)
class HistoryLineError:
    """One line of a histories file that gets no recommendations."""

    line: int
    user: Any
    message: str


@dataclass(frozen=True)
class History:
    """One resolved history: item ids oldest first; `line` and `user` as given (None outside a file)."""

    items: tuple[int, ...]
    line: int | None = None
    user: Any = None


class Catalogue:
    """Item titles by id, and the reverse lookup a user's history needs.

    Args:
        titles: Item titles indexed by item id (`IAMDataModule.titles`). A title shared by several items
            (ML-100K has 18 such groups) resolves to the smallest of their ids: the prompt holds only the
            title, so every one of them gives the same prompt. Titles are looked up in NFC
            (`normalize_title`), whatever form the catalogue or the user wrote them in.
    """

    def __init__(self, titles: Sequence[str]) -> None:
        self.titles = list(titles)
        self._ids: dict[str, int] = {}
        for item_id, title in enumerate(self.titles):
            self._ids.setdefault(normalize_title(title), item_id)

    def __len__(self) -> int:
        return len(self.titles)

    def close_titles(self, title: str, n: int = CLOSE_MATCHES) -> list[str]:
        """The `n` catalogue titles closest to `title` (difflib), best first; case is ignored."""
        folded = {normalize_title(t).casefold(): t for t in reversed(self.titles)}
        wanted = normalize_title(title).casefold()
        return [folded[t] for t in difflib.get_close_matches(wanted, list(folded), n=n, cutoff=0.4)]

    def item_id(self, item: Any) -> int:
        """The item id of a title (exact up to surrounding spaces and NFC) or of an id (a Python or numpy
        integer); `UnknownItemError` else."""
        if isinstance(item, numbers.Integral) and not isinstance(item, (bool, int)):
            item = int(item)  # numpy's integers (np.bool_ is no Integral)
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise UnknownItemError(
                f"history element {item!r} is neither an item title (a string) nor an item id (an integer)."
            )
        if isinstance(item, int):
            if not 0 <= item < len(self.titles):
                raise UnknownItemError(
                    f"item id {item} is not in the catalogue (ids 0..{len(self.titles) - 1})."
                )
            return item
        found = self._ids.get(normalize_title(item))
        if found is None:
            close = self.close_titles(item)
            hint = (
                "closest catalogue titles: " + ", ".join(repr(t) for t in close)
                if close
                else "no catalogue title is close to it"
            )
            raise UnknownItemError(f"unknown title {item!r}; {hint}.")
        return found

    def resolve(self, history: Sequence[Any]) -> tuple[int, ...]:
        """Item ids of a history of titles and/or ids (`UnknownItemError` at the first unknown one); a 1-D
        numpy array of ids is a history too."""
        if getattr(history, "ndim", None) == 1 and hasattr(history, "tolist"):
            history = history.tolist()
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise UnknownItemError(
                f"a history is a list of item titles or ids, got {type(history).__name__} {history!r}."
            )
        return tuple(self.item_id(item) for item in history)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`'s object hook: a key given twice is an error, not "the last one wins"."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise UnknownItemError(f"the key {key!r} appears twice in one JSON object; give it once.")
        record[key] = value
    return record


def read_histories(path: str | Path, catalogue: Catalogue) -> tuple[list[History], list[HistoryLineError]]:
    """The usable histories of a JSONL file (see the module docstring) and one error per unusable line.

    A missing or unreadable file, or one without a single non-blank line, is a `HistoryFileError`.
    """
    path = Path(path)
    if not path.is_file():
        raise HistoryFileError(f"data.predict_file {path} does not exist; give a JSONL file of histories.")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise HistoryFileError(f"data.predict_file {path} cannot be read as UTF-8 text ({err}).") from None
    histories: list[History] = []
    errors: list[HistoryLineError] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        user = None
        try:
            try:
                record = json.loads(text, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as err:
                raise UnknownItemError(f"not a JSON object ({err.msg} at column {err.colno}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("history"), list):
                raise UnknownItemError('expected an object with a "history" list, e.g. {"history": [1, 50]}.')
            user = record.get("user")
            histories.append(History(catalogue.resolve(record["history"]), number, user))
        except UnknownItemError as err:
            errors.append(HistoryLineError(number, user, str(err)))
    if not histories and not errors:
        raise HistoryFileError(f"data.predict_file {path} holds no histories (it has no non-blank line).")
    return histories, errors


def longest_answer(encoder: PromptEncoder) -> int:
    """The item id whose answer has the most tokens (it stands in for the unknown answer)."""
    return max(range(len(encoder.answer_ids)), key=lambda i: len(encoder.answer_ids[i]))


def encode_history(
    encoder: PromptEncoder, items: Sequence[int], index: int = 0, longest: int | None = None
) -> dict[str, Any]:
    """A `Collator` row holding the prompt of `items` (no answer): exactly the prompt tokens and segment
    ids training built for this history (see the module docstring for the length rule). `longest` is
    `longest_answer(encoder)`, computed when not given."""
    longest = longest_answer(encoder) if longest is None else longest
    sample = encoder.encode(items, longest)
    cut = sample.prompt_length
    return {
        "input_ids": sample.input_ids[:cut],
        "segment_ids": sample.segment_ids[:cut],
        "prompt_length": cut,
        "target": -1,
        "user_id": -1,
        "sample_index": index,
        "history_used": sample.num_items,
    }


class HistoryDataset(Dataset):
    """Prompts of given histories (`encode_history`); ``sample_index`` is the position in `histories`."""

    def __init__(self, encoder: PromptEncoder, histories: Sequence[History]) -> None:
        self.encoder, self.histories = encoder, list(histories)
        self._longest = longest_answer(encoder)

    def __len__(self) -> int:
        return len(self.histories)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return encode_history(self.encoder, self.histories[index].items, index, self._longest)
