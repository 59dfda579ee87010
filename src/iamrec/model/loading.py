"""Load backbones and tokenizers from a hub id, a local folder, or a named tiny random config.

A *model spec* is one string:

* ``tiny`` / ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-qwen3`` / ``tiny-mistral``: random-init, a few
  small layers, with the in-process tiny tokenizer (tests, `configs/tiny.yaml`);
* a local folder holding ``config.json`` (e.g. ``.assets/models/SmolLM2-135M-Instruct`` from
  ``make assets``);
* a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct`` (needs network or a warm HF cache).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from iamrec.model.tiny import build_tiny_tokenizer, tiny_config

TINY_SPECS = {
    "tiny": "llama",
    "tiny-llama": "llama",
    "tiny-qwen2": "qwen2",
    "tiny-qwen3": "qwen3",
    "tiny-mistral": "mistral",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneError(RuntimeError):
    """A backbone or tokenizer could not be loaded; the message says what to do."""


def looks_like_hub_id(spec: str) -> bool:
    return not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def _offline_message(spec: str, what: str, err: Exception | None = None) -> str:
    return (
        f"Could not load the {what} '{spec}': it is not a local folder and the Hugging Face hub is not "
        "reachable; point the config at a local folder instead "
        "(e.g. .assets/models/SmolLM2-135M-Instruct after `make assets`) or run where the hub is reachable."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of the hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(factory, spec: str, what: str, **kwargs):
    """Local folder or HF cache first; the hub only when it answers; one sentence otherwise."""
    try:
        return factory.from_pretrained(spec, local_files_only=True, **kwargs)
    except OSError as err:
        if Path(spec).exists():
            raise BackboneError(f"Could not load the {what} from folder '{spec}': {err}") from None
        if not hub_reachable():
            raise BackboneError(_offline_message(spec, what, err)) from None
    try:
        return factory.from_pretrained(spec, **kwargs)
    except OSError as err:
        raise BackboneError(_offline_message(spec, what, err)) from None


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a model spec; guarantees `eos_token_id` and `pad_token_id` are set."""
    if spec in TINY_SPECS:
        return build_tiny_tokenizer()
    if not Path(spec).exists() and not looks_like_hub_id(spec):
        raise BackboneError(
            f"Tokenizer/model '{spec}' is neither a local folder nor a hub id; check the path "
            "(run `make assets` for the SmolLM2 folder)."
        )
    tok = _from_pretrained(AutoTokenizer, spec, "tokenizer")
    if tok.eos_token_id is None:
        raise BackboneError(
            f"The tokenizer of '{spec}' has no eos token; set one in its tokenizer_config.json."
        )
    if tok.pad_token_id is None:
        # Padding tokens are always masked out, so reusing EOS is safe and keeps the vocabulary unchanged.
        tok.pad_token = tok.eos_token
    return tok


def load_backbone_config(spec: str, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The transformers config of a model spec (no weights are read)."""
    if spec in TINY_SPECS:
        config = tiny_config(TINY_SPECS[spec], vocab_size=len(build_tiny_tokenizer()))
    elif not Path(spec).exists() and not looks_like_hub_id(spec):
        raise BackboneError(
            f"Backbone '{spec}' is neither a local folder nor a hub id; check the path "
            "(run `make assets` for .assets/models/SmolLM2-135M-Instruct)."
        )
    else:
        config = _from_pretrained(AutoConfig, spec, "backbone config")
    config._attn_implementation = attn_implementation
    return config


def load_backbone(
    spec: str, dtype: str = "float32", attn_implementation: str = "sdpa", random_weights: bool = False
) -> PreTrainedModel:
    """Load a causal LM from a model spec (see module docstring) in `dtype`.

    `random_weights=True` builds the architecture from the spec's ``config.json`` with fresh random
    weights (the folder needs no weight files): for timing on machines the weights cannot reach.
    """
    if dtype not in _DTYPES:
        raise BackboneError(f"model dtype '{dtype}' is not one of {sorted(_DTYPES)}.")
    torch_dtype = _DTYPES[dtype]
    if spec in TINY_SPECS or random_weights:
        config = load_backbone_config(spec, attn_implementation)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    if not Path(spec).exists() and not looks_like_hub_id(spec):
        raise BackboneError(
            f"Backbone '{spec}' is neither a local folder nor a hub id; check the path "
            "(run `make assets` for .assets/models/SmolLM2-135M-Instruct)."
        )
    return _from_pretrained(
        AutoModelForCausalLM, spec, "backbone", dtype=torch_dtype, attn_implementation=attn_implementation
    )
