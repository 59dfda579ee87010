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

Atomic: the folder is written whole into a hidden temporary sibling (``.DIR.partial-<pid>``) and renamed
into place, so a full disk, a crash or a kill leaves the earlier export (``replace=True`` /
``--replace``) or nothing: never a partial folder under DIR. Self-describing: iamrec.json records the
catalogue the model was trained on (`iamrec.data.fingerprint`), and every file is checked when read back
(`iamrec.model.export_files`), a bad one named in one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from iamrec.attention import ItemAttentionConfig, apply_item_attention, base_model, remove_item_attention
from iamrec.data.fingerprint import check_catalogue
from iamrec.errors import DISK_ERRNOS
from iamrec.model.export_files import (
    FORMAT,
    ITEM_ATTENTION_FILE,
    SETTINGS_FILE,
    ExportError,
    check_tokenizer_files,
    check_weights,
    loading_error,
    read_item_attention,
    read_settings,
)
from iamrec.model.loading import load_backbone, load_tokenizer

__all__ = [
    "ITEM_ATTENTION_FILE",
    "SETTINGS_FILE",
    "ExportError",
    "export_model",
    "load_exported",
    "read_item_attention",
    "read_settings",
]


def _write_text(path: Path, text: str) -> None:
    """Write one small file of the export (a seam for the tests' full disk)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(err: BaseException) -> OSError | None:
    """The disk's refusal (full, read-only, permission ...) in `err`'s chain, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and (
            err.errno in DISK_ERRNOS or isinstance(err, (PermissionError, FileNotFoundError))
        ):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _check_out(out: Path, replace: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder; choose a new folder.")
    if out.is_dir() and any(out.iterdir()):
        if not replace:
            raise ExportError(
                f"--out {out} exists and is not an empty folder; choose a new folder (or --replace an earlier "
                "export there)."
            )
        if not (out / SETTINGS_FILE).is_file():
            raise ExportError(
                f"--replace: {out} is not an earlier export (it holds no {SETTINGS_FILE}), so it is not replaced; "
                "choose a new folder."
            )


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` onto `out` (nothing, an empty folder, or an earlier export)."""
    if not (out.is_dir() and any(out.iterdir())):
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    attention: ItemAttentionConfig,
    out: str | Path,
    settings: dict[str, Any] | None = None,
    replace: bool = False,
) -> Path:
    """Write `model` (item-aware, peft LoRA or not) as a merged Hugging Face folder `out` (see the module
    docstring). `model` itself becomes the merged stock model: LoRA is merged in place and item attention
    removed. `settings` (JSON-able) go into iamrec.json beside the backbone, dtype and whether LoRA was
    merged. `out` must be new or empty, or, with `replace`, an earlier export (replaced whole, atomically).
    A disk that refuses a file is an `ExportError` saying what is left at `out` (the earlier export or
    nothing); no temporary folder is left behind."""
    out = Path(out)
    _check_out(out, replace)
    record = {**(settings or {})}
    remove_item_attention(model)  # hooks are not saved anyway; the config must name a stock kernel
    merged = hasattr(model, "merge_and_unload")
    hf: PreTrainedModel = model.merge_and_unload() if merged else base_model(model)
    dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
    record = {"format": FORMAT, "dtype": dtype, "lora_merged": merged, **record}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_text(tmp / ITEM_ATTENTION_FILE, json.dumps(asdict(attention), indent=2) + "\n")
        _write_text(tmp / SETTINGS_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        _swap_in(tmp, out)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _disk_error(err)
        if cause is None:
            raise
        kept = (
            "the earlier export there is intact"
            if (out / SETTINGS_FILE).is_file()
            else "nothing was written there"
        )
        raise ExportError(f"could not write the export {out} ({cause.strerror or cause}); {kept}.") from err
    return out


def load_exported(
    folder: str | Path,
    dtype: str | None = None,
    data_dir: str | Path | None = None,
    allow_other_catalogue: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, Any]]:
    """(model with item-aware attention applied, tokenizer, iamrec.json settings) of an export folder.

    Every file is checked first (`iamrec.model.export_files`; a bad one is an `ExportError` naming it).
    `dtype` defaults to the dtype the weights were exported in. Given `data_dir` (the processed dataset
    the model will be used with), its catalogue must be the one the model was trained on
    (`iamrec.data.fingerprint`; a `CatalogueMismatchError` names both folders) unless
    `allow_other_catalogue`; an export without a recorded catalogue gets a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; give the folder `iamrec export --out` wrote.")
    attention = read_item_attention(folder)
    settings = read_settings(folder)
    if data_dir is not None:
        said = check_catalogue(
            settings.get("catalogue"), data_dir, folder, allow_other_catalogue, "allow_other_catalogue=True"
        )
        if said:
            warnings.warn(said, stacklevel=2)
    check_weights(folder)
    check_tokenizer_files(folder)
    attn = "eager" if attention.backend == "eager" else "sdpa"
    try:
        model = load_backbone(
            str(folder), dtype=dtype or settings.get("dtype", "float32"), attn_implementation=attn
        )
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        raise loading_error(folder, "weights", err) from None
    try:
        model = apply_item_attention(
            model, config=attention, config_key=f"{folder / ITEM_ATTENTION_FILE}: schedule"
        )
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"{folder / ITEM_ATTENTION_FILE} does not fit the model in {folder} ({err})."
        ) from None
    try:
        tokenizer = load_tokenizer(str(folder))
    except Exception as err:
        raise loading_error(folder, "tokenizer", err) from None
    return model.eval(), tokenizer, settings
