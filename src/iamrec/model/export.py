"""Export a trained model as a plain Hugging Face folder, and load it back item-aware.

`export_model` writes::

    DIR/config.json, model.safetensors, generation_config.json   save_pretrained of the merged model
    DIR/tokenizer.json, tokenizer_config.json, ...               the tokenizer (pad token set as trained)
    DIR/item_attention.json                                      ItemAttentionConfig as a dict
    DIR/iamrec.json                                              what else a recommender needs: the data
                                                                 settings of the prompt (template,
                                                                 max_items, max_length, data_dir),
                                                                 num_beams, backbone, dtype, LoRA merged

LoRA adapters are merged into the base weights (peft ``merge_and_unload``), so the folder holds an
ordinary model of the backbone's architecture that any transformers code can load (it then attends
causally); full fine-tuning is saved as it is. `load_exported` loads it and applies item-aware attention
from item_attention.json, which makes it the trained model again. Never imports Lightning.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from iamrec.attention import ItemAttentionConfig, apply_item_attention, base_model, remove_item_attention
from iamrec.model.loading import load_backbone, load_tokenizer

ITEM_ATTENTION_FILE = "item_attention.json"
SETTINGS_FILE = "iamrec.json"


class ExportError(ValueError):
    """An export folder that cannot be written or read back (the message names the folder or file)."""


def export_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    attention: ItemAttentionConfig,
    out: str | Path,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (item-aware, peft LoRA or not) as a merged Hugging Face folder `out` (see the module
    docstring). `model` itself becomes the merged stock model: LoRA is merged in place and item attention
    removed. `settings` (JSON-able) go into iamrec.json beside the backbone, dtype and whether LoRA was
    merged."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new folder.")
    remove_item_attention(model)  # hooks are not saved anyway; the config must name a stock kernel
    merged = hasattr(model, "merge_and_unload")
    hf: PreTrainedModel = model.merge_and_unload() if merged else base_model(model)
    dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / ITEM_ATTENTION_FILE).write_text(json.dumps(asdict(attention), indent=2) + "\n")
    record = {"format": 1, "dtype": dtype, "lora_merged": merged, **(settings or {})}
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} is missing; {path.parent} is not a folder `iamrec export` wrote.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ExportError(f"{path} cannot be read as JSON ({err}); export the model again.") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds no settings object; export the model again.")
    return data


def read_item_attention(folder: str | Path) -> ItemAttentionConfig:
    """The `ItemAttentionConfig` of an export folder."""
    path = Path(folder) / ITEM_ATTENTION_FILE
    data = _read_json(path)
    if isinstance(data.get("hatllm_bands"), list):
        data["hatllm_bands"] = tuple(data["hatllm_bands"])
    try:
        return ItemAttentionConfig(**data)
    except TypeError as err:
        raise ExportError(f"{path} is not an ItemAttentionConfig ({err}).") from None


def load_exported(
    folder: str | Path, dtype: str | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, Any]]:
    """(model with item-aware attention applied, tokenizer, iamrec.json settings) of an export folder.

    `dtype` defaults to the dtype the weights were exported in.
    """
    folder = Path(folder)
    attention = read_item_attention(folder)
    settings = _read_json(folder / SETTINGS_FILE)
    attn = "eager" if attention.backend == "eager" else "sdpa"
    model = load_backbone(
        str(folder), dtype=dtype or settings.get("dtype", "float32"), attn_implementation=attn
    )
    model = apply_item_attention(model, config=attention, config_key=f"{ITEM_ATTENTION_FILE}: schedule")
    return model.eval(), load_tokenizer(str(folder)), settings
