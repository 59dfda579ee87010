"""Which catalogue a trained model knows: the fingerprint of a processed dataset's items.parquet.

A model answers with the item ids and titles of the catalogue it was trained on; read against another
catalogue, its ids name other items without a word. So training records `catalogue_record` of its
``data.data_dir`` in every checkpoint (under `CATALOGUE_KEY`, by `IAMRecModule.on_save_checkpoint`) and
``iamrec export`` copies it into iamrec.json (``"catalogue"``). Whatever uses a trained model with data
compares the two with `check_catalogue`: ``iamrec test / validate / predict / fit --ckpt_path``,
`Recommender.from_checkpoint` / `from_exported` and `load_exported(..., data_dir=...)`. Another catalogue
is refused with one sentence naming both folders, unless explicitly allowed (``--allow_other_catalogue
true`` on the command line, ``allow_other_catalogue=True`` in Python); a checkpoint or export saved before
fingerprints were recorded gets a notice instead.

The fingerprint is ``items.parquet sha256:<hex>``: the sha256 data prep recorded for items.parquet in
stats.json (the loader verifies the file against it), or, when stats.json lacks one, the sha256 of the
file's bytes (the same value for the same file). Copies of a dataset in other folders share it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CATALOGUE_KEY = "iamrec_catalogue"
ITEMS_FILE = "items.parquet"
_PREFIX = f"{ITEMS_FILE} sha256:"


class CatalogueMismatchError(ValueError):
    """A trained model given another catalogue than the one it was trained on."""


def catalogue_fingerprint(data_dir: str | Path) -> str | None:
    """``items.parquet sha256:<hex>`` of a processed dataset (see the module docstring); None when the
    folder holds no items.parquet (the data loader then names what is missing)."""
    folder = Path(data_dir)
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        digest = stats["files"]["outputs"][ITEMS_FILE]["sha256"]
        if isinstance(digest, str) and len(digest) == 64:
            return _PREFIX + digest.lower()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        pass
    items = folder / ITEMS_FILE
    if not items.is_file():
        return None
    h = hashlib.sha256()
    with open(items, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return _PREFIX + h.hexdigest()


def catalogue_record(data_dir: str | Path) -> dict[str, str] | None:
    """What a checkpoint and an export record: ``{"fingerprint": ..., "data_dir": ...}`` (None when the
    folder cannot be fingerprinted)."""
    fingerprint = catalogue_fingerprint(data_dir)
    return None if fingerprint is None else {"fingerprint": fingerprint, "data_dir": str(data_dir)}


def check_catalogue(
    recorded: Any, data_dir: str | Path, source: str | Path, allow: bool, flag: str
) -> str | None:
    """Compare the record `source` (a checkpoint or export) holds with the catalogue of `data_dir`.

    Returns None when they match (or `data_dir` cannot be fingerprinted: its loader then refuses it), a
    notice when `source` records none (saved before fingerprints) or when a mismatch is `allow`-ed; raises
    `CatalogueMismatchError` (one sentence naming both folders and `flag`) for a mismatch."""
    current = catalogue_fingerprint(data_dir)
    if current is None:
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("fingerprint"), str):
        return (
            f"note: {source} records no catalogue fingerprint (it was saved before they were recorded), so "
            f"nothing checks that {data_dir} is the data it was trained on."
        )
    if recorded["fingerprint"] == current:
        return None
    trained_on = str(recorded.get("data_dir") or "?")
    same = trained_on != "?" and Path(trained_on).resolve() == Path(data_dir).resolve()
    if same:
        what = (
            f"{source} was trained on the catalogue of {data_dir} as it was then, and its {ITEMS_FILE} has "
            "changed since (data prep was re-run)"
        )
    else:
        what = (
            f"{source} was trained on the catalogue of {trained_on} and {data_dir} holds another one (its "
            f"{ITEMS_FILE} differs)"
        )
    if allow:
        return f"note: {what}; using it anyway ({flag}): item ids and titles may name other items."
    raise CatalogueMismatchError(
        f"{what}, so the model's item ids would name other items; give it the data it was trained on, or "
        f"pass {flag} to use this catalogue anyway."
    )
