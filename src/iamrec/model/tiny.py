"""Tiny, download-free building blocks for tests and `configs/tiny.yaml`.

* `build_tiny_tokenizer()` trains a small byte-level BPE tokenizer in-process (deterministic, a
  fraction of a second) and wraps it as a `PreTrainedTokenizerFast`, so no test needs the hub.
* `tiny_config(family)` returns a random-init config shaped like a real family (Llama, Qwen2, Qwen3,
  Mistral) with a few small layers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

Family = Literal["llama", "qwen2", "qwen3", "mistral"]

_CORPUS = """
Below is a user's history of items in chronological order. Recommend the next item.
The user has interacted with the following items: Toy Story (1995), GoldenEye (1995),
Four Rooms (1995), Get Shorty (1995), Copycat (1995), Twelve Monkeys (1995), Babe (1995),
Dead Man Walking (1995), Richard III (1995), Seven (Se7en) (1995), Usual Suspects, The (1995),
Mighty Aphrodite (1995), Postino, Il (1994), Mr. Holland's Opus (1995), French Twist (1995),
From Dusk Till Dawn (1996), White Balloon, The (1995), Antonia's Line (1995), Angels and Insects,
Muppet Treasure Island (1996), Braveheart (1995), Taxi Driver (1976), Rumble in the Bronx (1995),
LEGO Classic Bricks Set, Melissa & Doug Wooden Puzzle, Hot Wheels Car 5-Pack, Nerf Blaster,
Coleman Sleeping Bag, Yoga Mat Extra Thick, Neutrogena Hydro Boost Water Gel, Maybelline Mascara.
### Response: ### Instruction: ### Input: "a", "b", "c". 0123456789 abcdefghijklmnopqrstuvwxyz
ABCDEFGHIJKLMNOPQRSTUVWXYZ !?.,;:'"()[]{}&-_/\\#*+=<>@$%^~`|
"""


@lru_cache(maxsize=4)
def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (GPT-2 style, like SmolLM2/Qwen) trained on a fixed corpus.

    Every byte is in the alphabet, so any text is encodable. Special tokens: `<s>` (BOS),
    `</s>` (EOS), `<pad>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


def tiny_config(
    family: Family = "llama",
    vocab_size: int = 600,
    num_hidden_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
) -> PretrainedConfig:
    """A random-init config of `family` with a few small layers (for tests and `configs/tiny.yaml`)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    if family == "qwen3":
        kwargs["head_dim"] = hidden_size // num_attention_heads
    if family == "mistral":
        kwargs["sliding_window"] = None
    return AutoConfig.for_model(family, **kwargs)
