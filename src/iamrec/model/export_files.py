"""Reading an export folder back (`iamrec.model.export`): every file checked, and named when it is wrong.

An export folder is untrusted input (shared, copied, edited by hand): each file `load_exported` reads is
checked here first and a bad one is an `ExportError`, one sentence naming the file (and so the folder)
and what is wrong with it:

    item_attention.json   a JSON object of `ItemAttentionConfig` fields with valid values
    iamrec.json           format 1; dtype one of float32 / bfloat16 / float16; lora_merged a bool;
                          num_beams an integer >= 1; data the recorded data settings (template,
                          max_items, max_length, eval_batch_size, data_dir, tokenizer) of the right types;
                          catalogue the recorded fingerprint (`iamrec.data.fingerprint`)
    config.json           a JSON object (the model's transformers config)
    model.safetensors     readable safetensors (or model.safetensors.index.json and its shards)
    tokenizer files       tokenizer_config.json and tokenizer.json / tokenizer.model / vocab.json

Never imports Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iamrec.attention import ItemAttentionConfig
from iamrec.data.prompt import PromptTemplate

ITEM_ATTENTION_FILE = "item_attention.json"
SETTINGS_FILE = "iamrec.json"
FORMAT = 1
DTYPES = ("float32", "bfloat16", "float16")
AGAIN = "export the model again (iamrec export)"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ExportError(ValueError):
    """An export folder that cannot be written or read back (the message names the folder or file)."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


def read_json(path: Path, what: str = "settings") -> dict[str, Any]:
    """The JSON object in `path`; an `ExportError` naming it when it is missing, unreadable or no object."""
    if not path.is_file():
        raise ExportError(f"{path} is missing; {path.parent} is not a folder `iamrec export` wrote.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ExportError(f"{path} cannot be read as JSON ({_first_line(err)}); {AGAIN}.") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds no {what} object (a JSON {type(data).__name__}); {AGAIN}.")
    return data


def read_item_attention(folder: str | Path) -> ItemAttentionConfig:
    """The `ItemAttentionConfig` of an export folder (checked: field names, types and values)."""
    path = Path(folder) / ITEM_ATTENTION_FILE
    data = read_json(path, "item-attention settings")
    schedule = data.get("schedule", "iam")
    if not isinstance(schedule, str) and not (
        isinstance(schedule, list) and all(isinstance(s, str) for s in schedule)
    ):
        raise ExportError(f"{path}: schedule must be a preset name or a list of strings, got {schedule!r}.")
    bands = data.get("hatllm_bands")
    if isinstance(bands, list):
        data["hatllm_bands"] = tuple(bands)
    for key, kinds in (("context_visible", (bool,)), ("split_at", (int, type(None)))):
        if key in data and (not isinstance(data[key], kinds) or (key == "split_at" and data[key] is True)):
            raise ExportError(f"{path}: {key} has the wrong type ({data[key]!r}); {AGAIN}.")
    try:
        return ItemAttentionConfig(**data)
    except (TypeError, ValueError) as err:
        raise ExportError(f"{path} is not a valid item-attention config ({_first_line(err)}).") from None


def _int(value: Any, minimum: int, none_ok: bool = False) -> bool:
    if value is None:
        return none_ok
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def read_settings(folder: str | Path) -> dict[str, Any]:
    """iamrec.json of an export folder, checked (see the module docstring)."""
    path = Path(folder) / SETTINGS_FILE
    s = read_json(path)

    def bad(key: str, want: str) -> ExportError:
        value: Any = s
        for part in key.split("."):  # "data.max_length": s["data"]["max_length"]
            value = value.get(part) if isinstance(value, dict) else None
        return ExportError(f"{path}: {key} must be {want}, got {value!r}; {AGAIN}.")

    if s.get("format") != FORMAT or isinstance(s.get("format"), bool):
        raise ExportError(
            f"{path}: format {s.get('format')!r} is not {FORMAT}, the export format this iamrec reads; {AGAIN}."
        )
    if "dtype" in s and s["dtype"] not in DTYPES:
        raise bad("dtype", "one of " + ", ".join(DTYPES))
    if "lora_merged" in s and not isinstance(s["lora_merged"], bool):
        raise bad("lora_merged", "true or false")
    if "num_beams" in s and not _int(s["num_beams"], 1):
        raise bad("num_beams", "an integer >= 1")
    if "backbone" in s and not isinstance(s["backbone"], str):
        raise bad("backbone", "a string")
    data = s.get("data", {})
    if not isinstance(data, dict):
        raise bad("data", "an object of data settings")
    checks = {
        "max_items": (lambda v: _int(v, 0, none_ok=True), "an integer >= 0 or null"),
        "max_length": (lambda v: _int(v, 1), "an integer >= 1"),
        "eval_batch_size": (lambda v: _int(v, 1), "an integer >= 1"),
        "data_dir": (lambda v: v is None or isinstance(v, str), "a folder name or null"),
        "tokenizer": (lambda v: isinstance(v, str), "a string"),
        "template": (lambda v: v is None or isinstance(v, dict), "an object of template fields or null"),
    }
    for key, (ok, want) in checks.items():
        if key in data and not ok(data[key]):
            raise bad(f"data.{key}", want)
    if isinstance(data.get("template"), dict):
        try:
            PromptTemplate(**data["template"])
        except (TypeError, ValueError) as err:
            raise ExportError(
                f"{path}: data.template is not a prompt template ({_first_line(err)})."
            ) from None
    catalogue = s.get("catalogue")
    if catalogue is not None and not (
        isinstance(catalogue, dict) and isinstance(catalogue.get("fingerprint"), str)
    ):
        raise bad("catalogue", 'null or {"fingerprint": ..., "data_dir": ...}')
    return s


def check_tokenizer_files(folder: Path) -> None:
    """The tokenizer's files are there (the first one a tokenizer needs is named when missing)."""
    if not (folder / "tokenizer_config.json").is_file():
        raise ExportError(
            f"{folder / 'tokenizer_config.json'} is missing: {folder} holds no tokenizer; {AGAIN}."
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(
            f"{folder / TOKENIZER_FILES[0]} is missing (nor is there {' or '.join(TOKENIZER_FILES[1:])}): "
            f"{folder} holds no tokenizer vocabulary; {AGAIN}."
        )


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise ExportError(f"{path} is missing: {path.parent} holds no model weights; {AGAIN}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError (a bare Exception subclass), OSError
        raise ExportError(
            f"{path} cannot be read as safetensors weights ({_first_line(err)}); {AGAIN}."
        ) from None


def check_weights(folder: Path) -> None:
    """config.json is a JSON object and the weights' headers are readable safetensors."""
    read_json(folder / "config.json", "model config")
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        _check_safetensors(folder / WEIGHTS_FILE)
        return
    shards = read_json(index, "weights index").get("weight_map")
    if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
        raise ExportError(f"{index} holds no weight_map of shard files; {AGAIN}.")
    for name in sorted(set(shards.values())):
        if Path(name).name != name:
            raise ExportError(f"{index} names the shard {name!r} outside {folder}; {AGAIN}.")
        _check_safetensors(folder / name)


def loading_error(folder: Path, what: str, err: BaseException) -> ExportError:
    """The sentence for a `what` (weights, tokenizer) of `folder` that passed the checks but still failed
    to load."""
    return ExportError(f"{folder}: the {what} cannot be loaded ({_first_line(err)}); {AGAIN}.")
