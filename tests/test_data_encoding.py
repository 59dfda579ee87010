"""Prompt template, in-context tokenization, exact token/segment/label layout, truncation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iamrec.data import (
    PromptEncoder,
    PromptTemplate,
    PromptTemplateError,
    SequenceTooLongError,
    TokenizationError,
    encode_answer,
    tokenize_in_context,
)
from iamrec.data.collate import IGNORE_INDEX, Collator
from iamrec.model.tiny import build_tiny_tokenizer
from iamrec.segments import CONTEXT, PAD, TARGET

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)"]
SMOLLM2 = Path(os.environ.get("IAMREC_SMOLLM2", ".assets/models/SmolLM2-135M-Instruct"))
INSTRUCTION = "<s>Below is a user's history of items, oldest first. Predict the next item.\n"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def enc(tok):
    return PromptEncoder(tok, PromptTemplate(), TITLES)


def segment_texts(tok, ids, segs) -> dict[int, str]:
    """Decode the tokens of each segment (in order of first appearance)."""
    out: dict[int, list[int]] = {}
    for i, s in zip(ids, segs):
        out.setdefault(s, []).append(i)
    return {s: tok.decode(x) for s, x in out.items()}


def whole_prompt_ids(tok, template, history, target) -> list[int]:
    prompt, answer = template.render([TITLES[i] for i in history], TITLES[target])
    return (
        [tok.bos_token_id] + tok(prompt + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    )


# --- template -------------------------------------------------------------------------------------------
def test_default_template_renders_the_documented_prompt():
    prompt, answer = PromptTemplate().render(TITLES, "Copycat (1995)")
    assert prompt == (
        "Below is a user's history of items, oldest first. Predict the next item.\n"
        'History: "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)"\n### Response:\n'
    )
    assert answer == "Copycat (1995)"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"item_format": '"title"'}, "item_format"),
        ({"item_format": "{title} {year}"}, "item_format"),
        ({"answer_format": "{title}{title}"}, "answer_format"),
        ({"answer_format": "{"}, "answer_format"),
        ({"response_header": "  "}, "response_header"),
        ({"boundary_whitespace": "both"}, "boundary_whitespace"),
    ],
)
def test_bad_template_fields_are_named(kwargs, field):
    with pytest.raises(PromptTemplateError, match=f"template.{field}"):
        PromptTemplate(**kwargs)


# --- exact layout on the fixture -------------------------------------------------------------------------
def test_exact_tokens_segments_and_labels(tok, enc):
    s = enc.encode([0, 1], 2)
    # Literal ids of the tiny tokenizer: item 1 = ' "Toy Story (1995)",', item 2 = ' "GoldenEye (1995)"'.
    item1 = [299, 54, 457, 550, 259, 263, 11, 311]
    item2 = [299, 41, 555, 378, 71, 259, 263, 11, 4]
    header = [201, 308, 344, 473, 469, 28, 201]
    answer = [382, 84, 559, 295, 259, 263, 11, 2]
    head = enc.head_ids
    assert head[0] == tok.bos_token_id == 1 and len(head) == 36
    assert s.input_ids == head + item1 + item2 + header + answer
    assert s.segment_ids == [CONTEXT] * 36 + [1] * 8 + [2] * 9 + [CONTEXT] * 7 + [TARGET] * 8
    assert s.prompt_length == 36 + 8 + 9 + 7 and s.num_items == 2
    assert segment_texts(tok, s.input_ids, s.segment_ids) == {
        CONTEXT: INSTRUCTION + "History:\n### Response:\n",
        1: ' "Toy Story (1995)",',
        2: ' "GoldenEye (1995)"',
        TARGET: "Four Rooms (1995)</s>",
    }
    labels = Collator(tok.pad_token_id)([_row(s)])["labels"][0].tolist()
    assert labels == [IGNORE_INDEX] * s.prompt_length + answer
    assert answer == encode_answer(tok, PromptTemplate(), "Four Rooms (1995)")


def test_boundary_whitespace_previous_keeps_the_literal_text_split(tok):
    enc = PromptEncoder(tok, PromptTemplate(boundary_whitespace="previous"), TITLES)
    s = enc.encode([0, 1], 2)
    assert segment_texts(tok, s.input_ids, s.segment_ids) == {
        CONTEXT: INSTRUCTION + "History: \n### Response:\n",
        1: '"Toy Story (1995)", ',
        2: '"GoldenEye (1995)"',
        TARGET: "Four Rooms (1995)</s>",
    }
    assert tok.decode(s.input_ids) == tok.decode(whole_prompt_ids(tok, PromptTemplate(), [0, 1], 2))


def _row(s, target=2):
    return {
        "input_ids": s.input_ids,
        "segment_ids": s.segment_ids,
        "prompt_length": s.prompt_length,
        "target": target,
        "user_id": 7,
        "sample_index": 0,
    }


# --- tokenization in context ------------------------------------------------------------------------------
@pytest.mark.parametrize("history", [[], [0], [0, 1], [2, 0, 1], [1, 1]])
def test_pieces_equal_whole_prompt_tokenization_tiny(tok, enc, history):
    """Concatenated per-item pieces are exactly the tokens of the whole prompt string."""
    s = enc.encode(history, 2)
    assert s.input_ids == whole_prompt_ids(tok, PromptTemplate(), history, 2)


def test_standalone_item_tokenization_differs_from_in_context_tiny(tok, enc):
    standalone = tok('"Toy Story (1995)", ', add_special_tokens=False)["input_ids"]
    in_context = enc.encode([0, 1], 2)
    item1 = [i for i, g in zip(in_context.input_ids, in_context.segment_ids) if g == 1]
    assert standalone != item1  # '"' + ... + 'Ġ' alone vs 'Ġ"' + ... in the prompt
    assert tok.convert_ids_to_tokens(item1)[0] == 'Ġ"'


@pytest.mark.slow
def test_in_context_tokenization_with_smollm2():
    if not (SMOLLM2 / "tokenizer.json").is_file() and not (SMOLLM2 / "tokenizer_config.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (run `make assets`)")
    from iamrec.model.loading import load_tokenizer

    tok = load_tokenizer(str(SMOLLM2))
    titles = [*TITLES, "Copycat (1995)", "Twelve Monkeys (1995)"]
    template = PromptTemplate()
    enc = PromptEncoder(tok, template, titles)
    history, target = [0, 1, 4, 2], 3
    s = enc.encode(history, target)
    prompt, answer = template.render([titles[i] for i in history], titles[target])
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    whole = bos + tok(prompt + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert s.input_ids == whole
    # Where standalone tokenization differs: the opening quote of an item merges with the space before it
    # in context ('Ġ"'), and the trailing space of the separator becomes a token of its own when alone.
    item1 = [i for i, g in zip(s.input_ids, s.segment_ids) if g == 1]
    standalone = tok('"Toy Story (1995)", ', add_special_tokens=False)["input_ids"]
    assert item1 != standalone
    assert tok.convert_ids_to_tokens(item1)[0] == 'Ġ"' and tok.convert_ids_to_tokens(standalone)[0] == '"'
    assert [i for i, g in zip(s.input_ids, s.segment_ids) if g == TARGET] == encode_answer(
        tok, template, "Copycat (1995)"
    )


def test_tokenize_in_context_falls_back_then_raises(tok):
    # 'Toy St' + 'ory' merge into 'ĠStory': the anchor's last token is not a prefix -> fallback "\n".
    with pytest.warns(UserWarning, match="merge with the text before them"):
        out = tokenize_in_context(tok, "Toy St", ["ory (1995)"], "history item")
    assert out[0] == tok("\nory (1995)", add_special_tokens=False)["input_ids"][1:]
    assert tok.decode(out[0]) == "ory (1995)"

    class Merging:  # a tokenizer that maps every string to one token: nothing can be split
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[hash(t) % 1000] for t in texts]}

    with (
        pytest.raises(TokenizationError, match="Cannot tokenize the history item"),
        pytest.warns(UserWarning, match="merge with the text before them"),
    ):
        tokenize_in_context(Merging(), "abc", ["def"], "history item")


def test_tokenizer_without_bos(tok):
    class NoBos:
        bos_token_id = None
        eos_token_id = tok.eos_token_id

        def __call__(self, texts, add_special_tokens=False):
            return tok(texts, add_special_tokens=add_special_tokens)

    s = PromptEncoder(NoBos(), PromptTemplate(), TITLES).encode([0], 1)
    assert s.input_ids[0] != tok.bos_token_id
    assert s.input_ids == whole_prompt_ids(tok, PromptTemplate(), [0], 1)[1:]


# --- truncation -------------------------------------------------------------------------------------------
def test_max_items_keeps_most_recent_and_renumbers(tok):
    enc = PromptEncoder(tok, PromptTemplate(), TITLES, max_items=2)
    s = enc.encode([2, 0, 1], 2)
    texts = segment_texts(tok, s.input_ids, s.segment_ids)
    assert texts[1] == ' "Toy Story (1995)",' and texts[2] == ' "GoldenEye (1995)"' and 3 not in texts
    assert s.input_ids == whole_prompt_ids(tok, PromptTemplate(), [0, 1], 2)
    assert PromptEncoder(tok, PromptTemplate(), TITLES, max_items=0).encode([0, 1], 2).num_items == 0


def test_max_length_drops_whole_oldest_items(tok, enc):
    full = enc.encode([2, 0, 1], 2)
    two = enc.encode([0, 1], 2)
    one = enc.encode([1], 2)
    for max_length, expected in [
        (len(full.input_ids), full),
        (len(full.input_ids) - 1, two),
        (len(two.input_ids), two),
        (len(two.input_ids) - 1, one),
    ]:
        short = PromptEncoder(tok, PromptTemplate(), TITLES, max_length=max_length)
        got = short.encode([2, 0, 1], 2)
        assert got == expected and len(got.input_ids) <= max_length
        assert short.length([2, 0, 1], 2) == len(got.input_ids)
    none = enc.encode([], 2)
    got = PromptEncoder(tok, PromptTemplate(), TITLES, max_length=len(none.input_ids)).encode([2, 0, 1], 2)
    assert got == none and set(got.segment_ids) == {CONTEXT, TARGET}


def test_max_length_too_short_for_any_answer_names_the_key(tok, enc):
    needed = len(enc.encode([], 1).input_ids)  # 'GoldenEye (1995)' has the longest answer
    with pytest.raises(SequenceTooLongError, match=f"max_length={needed - 1} is too short"):
        PromptEncoder(tok, PromptTemplate(), TITLES, max_length=needed - 1)


# --- padding ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding_sides_and_prompt_left_padding(tok, enc, side):
    a, b = enc.encode([0, 1], 2), enc.encode([], 0)
    batch = Collator(tok.pad_token_id, side, with_prompt=True)([_row(a), _row(b, target=0)])
    la, lb = len(a.input_ids), len(b.input_ids)
    assert batch["input_ids"].shape == (2, la) and la > lb
    pad = la - lb
    ids_b, seg_b = batch["input_ids"][1].tolist(), batch["segment_ids"][1].tolist()
    lab_b, mask_b = batch["labels"][1].tolist(), batch["attention_mask"][1].tolist()
    if side == "right":
        assert ids_b == b.input_ids + [tok.pad_token_id] * pad and seg_b == b.segment_ids + [PAD] * pad
        assert mask_b == [1] * lb + [0] * pad and lab_b[lb:] == [IGNORE_INDEX] * pad
    else:
        assert ids_b == [tok.pad_token_id] * pad + b.input_ids and seg_b == [PAD] * pad + b.segment_ids
        assert mask_b == [0] * pad + [1] * lb and lab_b[:pad] == [IGNORE_INDEX] * pad
    # The prompt is always left-padded and ends with the response header.
    pa, pb = a.prompt_length, b.prompt_length
    assert batch["prompt_input_ids"].shape == (2, pa)
    assert batch["prompt_input_ids"][1].tolist() == [tok.pad_token_id] * (pa - pb) + b.input_ids[:pb]
    assert batch["prompt_segment_ids"][1].tolist() == [PAD] * (pa - pb) + b.segment_ids[:pb]
    assert batch["prompt_attention_mask"][1].tolist() == [0] * (pa - pb) + [1] * pb
    assert batch["prompt_input_ids"][0].tolist() == a.input_ids[:pa]
    assert batch["target"].tolist() == [2, 0] and batch["user_id"].tolist() == [7, 7]


def test_pad_to_multiple_of(tok, enc):
    a = enc.encode([0, 1], 2)
    batch = Collator(tok.pad_token_id, pad_to_multiple_of=64, with_prompt=True)([_row(a)])
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["prompt_input_ids"].shape[1] % 64 == 0
    assert batch["segment_ids"][0, len(a.input_ids) :].eq(PAD).all()
