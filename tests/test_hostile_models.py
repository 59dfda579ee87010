"""Hostile input around trained models (issue 20, points 4-7): a checkpoint or export given another
catalogue, a title holding a special token, titles in another Unicode form and duplicate JSON keys, an
export to a full disk, malformed export files, ``--ckpt_path best`` without a best checkpoint.

Every case pins the exit status, the one sentence, and what is on disk afterwards (nothing new outside the
target, nothing lost). In-process (`iamrec.cli.main`, `iamrec.errors.guarded`), one torch thread.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_stats
from test_hostile_cli import REPO, cli, one_sentence, tiny, tree

from iamrec.cli import main
from iamrec.data.fingerprint import CATALOGUE_KEY, CatalogueMismatchError, catalogue_fingerprint
from iamrec.data.histories import Catalogue, read_histories
from iamrec.errors import guarded
from iamrec.model import export as export_module
from iamrec.model.export import load_exported
from iamrec.recommend import Recommender
from iamrec.recommend import main as recommend_main


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name paths relative to the repository root
    monkeypatch.setattr(sys, "argv", ["iamrec"])
    monkeypatch.delenv("IAMREC_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, processed_dir) -> Path:
    """A run folder holding checkpoints/last.ckpt of a 2-step fit (no validation, so no best.ckpt)."""
    root = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setattr(sys, "argv", ["iamrec"])
        code, err = cli(["fit", *tiny(processed_dir, root)])
    assert code == 0, err[-3000:]
    return root


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    code, err = cli(["export", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--out", str(out)])
    assert code == 0, err[-3000:]
    return out


def with_titles(source: Path, dest: Path, titles: dict[int, str]) -> Path:
    """A copy of the processed dataset `source` with some titles changed (stats.json vouching for it)."""
    shutil.copytree(source, dest)
    items = pd.read_parquet(dest / "items.parquet")
    for item_id, title in titles.items():
        items.loc[items["item_id"] == item_id, "title"] = title
    items.to_parquet(dest / "items.parquet", index=False)
    write_stats(dest)
    return dest


@pytest.fixture(scope="module")
def other_data(processed_dir, tmp_path_factory) -> Path:
    return with_titles(processed_dir, tmp_path_factory.mktemp("other") / "data", {0: "Toy Story 2 (1999)"})


def _run_copy(trained: Path, root: Path) -> Path:
    shutil.copytree(trained / "checkpoints", root / "checkpoints")
    return root


# --------------------------------------------------------------------------- a checkpoint knows its data


def mismatch(source, trained_on, given, flag: str) -> str:
    return (
        f"{source} was trained on the catalogue of {trained_on} and {given} holds another one (its "
        "items.parquet differs), so the model's item ids would name other items; give it the data it was "
        f"trained on, or pass {flag} to use this catalogue anyway."
    )


def test_checkpoints_and_exports_record_their_catalogue(trained, exported, processed_dir):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    stats = json.loads((processed_dir / "stats.json").read_text())
    sha = stats["files"]["outputs"]["items.parquet"]["sha256"]
    record = {"fingerprint": f"items.parquet sha256:{sha}", "data_dir": str(processed_dir)}
    assert ckpt[CATALOGUE_KEY] == record and catalogue_fingerprint(processed_dir) == record["fingerprint"]
    assert json.loads((exported / "iamrec.json").read_text())["catalogue"] == record


@pytest.mark.parametrize("command", ["test", "predict"])
def test_a_checkpoint_given_another_catalogue_is_refused(
    command, trained, other_data, processed_dir, tmp_path
):
    root = _run_copy(trained, tmp_path / "run")
    before, data_before = tree(root), tree(other_data)
    code, err = cli([command, *tiny(other_data, root), "--ckpt_path=last"])
    last = root / "checkpoints" / "last.ckpt"
    assert code == 2
    assert one_sentence(err) == "iamrec: error: " + mismatch(
        last, processed_dir, other_data, "--allow_other_catalogue true"
    )
    assert tree(root) == before and tree(other_data) == data_before  # nothing written, nothing lost


def test_another_catalogue_is_used_when_allowed_and_an_old_checkpoint_gets_a_notice(
    trained, other_data, processed_dir, tmp_path
):
    root = _run_copy(trained, tmp_path / "run")
    code, err = cli(["test", *tiny(other_data, root), "--ckpt_path=last", "--allow_other_catalogue=true"])
    assert code == 0, err[-3000:]
    assert "using it anyway (--allow_other_catalogue true): item ids and titles may name other items." in err
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    del ckpt[CATALOGUE_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    code, err = cli(["test", *tiny(processed_dir, tmp_path / "run-old"), f"--ckpt_path={old}"])
    assert code == 0, err[-3000:]
    assert (
        f"iamrec: note: {old} records no catalogue fingerprint (it was saved before they were recorded), so "
        f"nothing checks that {processed_dir} is the data it was trained on." in err
    )


def test_the_python_api_refuses_another_catalogue(trained, exported, other_data, processed_dir, tmp_path):
    last = trained / "checkpoints" / "last.ckpt"
    code, err = cli([str(last), "--data_dir", str(other_data)], recommend_main)
    flag = "allow_other_catalogue=True"
    assert code == 2 and one_sentence(err) == "iamrec: error: " + mismatch(
        last, processed_dir, other_data, flag
    )
    with pytest.raises(CatalogueMismatchError) as info:
        Recommender.from_exported(exported, data_dir=other_data)
    assert str(info.value) == mismatch(exported, processed_dir, other_data, flag)
    with pytest.raises(CatalogueMismatchError):
        load_exported(exported, data_dir=other_data)
    with pytest.warns(UserWarning, match=r"using it anyway \(allow_other_catalogue=True\)"):
        Recommender.from_checkpoint(last, data_dir=other_data, allow_other_catalogue=True)
    copy = tmp_path / "copy"  # the same catalogue in another folder is the same catalogue
    shutil.copytree(processed_dir, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = Recommender.from_exported(exported, data_dir=copy)
    # numpy integers (and a numpy history) are item ids
    assert rec.item_ids([np.int64(3), "Babe (1995)"]) == [3, 6]
    assert rec.item_ids(np.array([0, 21])) == [0, 21]


# ---------------------------------------------------------------------------------- titles it can say


@pytest.mark.parametrize("token", ["</s>", "<pad>"])
def test_a_title_holding_a_special_token_is_refused_at_set_up(token, processed_dir, tmp_path):
    title = f"Get Shorty {token} (1995)"
    data = with_titles(processed_dir, tmp_path / "data", {3: title})
    before, root = tree(data), tmp_path / "run"
    code, err = cli(["fit", *tiny(data, root)])
    assert code == 2
    assert one_sentence(err) == (
        f"iamrec: error: {data}/items.parquet: item 3 has the title {title!r}, whose tokens include the "
        f"tokenizer's special token {token!r}, so the model could never say that title; rewrite or drop "
        "it and re-run the data prep."
    )
    assert not root.exists() and tree(data) == before


# ------------------------------------------------------------------------------------------------ NFC

NFC, NFD = "Am\u00e9lie (2001)", "Ame\u0301lie (2001)"


def test_data_prep_writes_titles_in_nfc_and_records_it(tmp_path):
    from data_prep.common import build_dataset
    from data_prep.protocols import ProtocolConfig

    titles = [NFD] + [f"Film {i}" for i in range(2, 7)]
    items = pd.DataFrame({"raw_item_id": [str(i) for i in range(1, 7)], "title": titles})
    inter = pd.DataFrame(
        [
            {"raw_user_id": str(u), "raw_item_id": str((u + j) % 6 + 1), "timestamp": 10**6 + 100 * j + u}
            for u in range(4)
            for j in range(5)
        ]
    )
    out = tmp_path / "data"
    stats = build_dataset(
        items=items, interactions=inter, cfg=ProtocolConfig("loo"), output=out, input_files=[], source={}
    )
    assert stats["title_normalization"] == "NFC"
    assert json.loads((out / "stats.json").read_text())["title_normalization"] == "NFC"
    assert pd.read_parquet(out / "items.parquet")["title"].iloc[0] == NFC != NFD
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_titles_are_looked_up_in_nfc_and_duplicate_json_keys_are_refused(tmp_path):
    catalogue = Catalogue([NFC, "Cafe\u0301 (1999)", "Heat (1995)"])  # an old catalogue may hold NFD
    assert catalogue.resolve([NFD, " Caf\u00e9 (1999) ", np.int32(2)]) == (0, 1, 2)
    with pytest.raises(ValueError, match="neither an item title"):
        catalogue.resolve([np.bool_(True)])
    file = tmp_path / "histories.jsonl"
    lines = [json.dumps({"history": [NFD, 2]}), '{"history": [0], "history": ["Heat (1995)"]}']
    file.write_text("\n".join(lines) + "\n")
    histories, errors = read_histories(file, catalogue)
    assert [h.items for h in histories] == [(0, 2)]
    assert [(e.line, e.message) for e in errors] == [
        (2, "the key 'history' appears twice in one JSON object; give it once.")
    ]


def test_predict_finds_a_decomposed_title_and_reports_a_duplicate_key(processed_dir, tmp_path):
    data = with_titles(processed_dir, tmp_path / "data", {0: NFC})
    file, root = tmp_path / "histories.jsonl", tmp_path / "run"
    file.write_text(
        json.dumps({"user": "u", "history": [NFD, 1]}) + '\n{"user": 1, "user": 2, "history": [1]}\n'
    )
    code, err = cli(["predict", *tiny(data, root), f"--data.predict_file={file}", "--recommend.top_k=3"])
    assert code == 1 and "Traceback" not in err
    assert f"iamrec: {file} line 2: the key 'user' appears twice in one JSON object; give it once." in err
    (written,) = root.rglob("recommendations.jsonl")
    out = [json.loads(line) for line in written.read_text().splitlines()]
    assert out[0]["history"] == [NFC, "GoldenEye (1995)"] and len(out[0]["recommendations"]) == 3
    assert out[1] == {
        "line": 2,
        "user": None,
        "error": "the key 'user' appears twice in one JSON object; give it once.",
    }
    assert unicodedata.is_normalized("NFC", out[0]["history"][0])


# ------------------------------------------------------------------------------ exports: a full disk


def full_disk(path, text: str) -> None:
    """`export._write_text` on a full disk: half of the file, then ENOSPC."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[: len(text) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def export_args(trained: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--out", str(out), *extra]


def test_an_export_to_a_full_disk_leaves_nothing(trained, tmp_path, monkeypatch):
    out = tmp_path / "exports" / "model"
    monkeypatch.setattr(export_module, "_write_text", full_disk)
    code, err = cli(export_args(trained, out))
    assert code == 2
    assert one_sentence(err) == (
        f"iamrec: error: could not write the export {out} (No space left on device); nothing was written there."
    )
    assert os.listdir(out.parent) == []  # no partial folder to block the next export


def test_replacing_an_export_on_a_full_disk_keeps_the_earlier_one(trained, exported, tmp_path, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(exported, out)
    before = tree(out)
    code, err = cli(export_args(trained, out))
    assert code == 2 and one_sentence(err) == (
        f"iamrec: error: --out {out} exists and is not an empty folder; choose a new folder (or --replace an "
        "earlier export there)."
    )
    with monkeypatch.context() as mp:
        mp.setattr(export_module, "_write_text", full_disk)
        code, err = cli(export_args(trained, out, "--replace"))
    assert code == 2 and one_sentence(err) == (
        f"iamrec: error: could not write the export {out} (No space left on device); the earlier export "
        "there is intact."
    )
    assert tree(out) == before and os.listdir(tmp_path) == ["model"]
    code, err = cli(export_args(trained, out, "--replace"))  # room again: replaced whole
    assert code == 0, err[-3000:]
    assert os.listdir(tmp_path) == ["model"] and sorted(tree(out)) == sorted(before)
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = cli(export_args(trained, other, "--replace"))
    assert code == 2 and one_sentence(err) == (
        f"iamrec: error: --replace: {other} is not an earlier export (it holds no iamrec.json), so it is not "
        "replaced; choose a new folder."
    )
    assert tree(other) == {"notes.txt": b"mine"}


# ------------------------------------------------------------------------------ malformed export files


def _edit_json(name: str, **changes):
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        for key, value in changes.items():
            where = data
            *parents, last = key.split("__")
            for p in parents:
                where = where[p]
            where[last] = value
        (folder / name).write_text(json.dumps(data))

    return edit


def _write(name: str, content: bytes | None):
    def edit(folder: Path) -> None:
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(content)

    return edit


def _truncate(name: str):
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


AGAIN = "export the model again (iamrec export)."
MALFORMED = {
    "attention-not-json": (
        _write("item_attention.json", b"{schedule"),
        "{d}/item_attention.json cannot be read as JSON (",
    ),
    "attention-a-list": (
        _write("item_attention.json", b"[1, 2]"),
        "{d}/item_attention.json holds no item-attention settings object (a JSON list); " + AGAIN,
    ),
    "bad-schedule": (
        _edit_json("item_attention.json", schedule="bogus"),
        "{d}/item_attention.json is not a valid item-attention config (",
    ),
    "schedule-a-number": (
        _edit_json("item_attention.json", schedule=3),
        "{d}/item_attention.json: schedule must be a preset name or a list of strings, got 3.",
    ),
    "settings-not-json": (_write("iamrec.json", b""), "{d}/iamrec.json cannot be read as JSON ("),
    "settings-missing": (_write("iamrec.json", None), "{d}/iamrec.json is missing; {d} is not a folder"),
    "bad-dtype": (
        _edit_json("iamrec.json", dtype="float64"),
        "{d}/iamrec.json: dtype must be one of float32, bfloat16, float16, got 'float64'; " + AGAIN,
    ),
    "num-beams-a-string": (
        _edit_json("iamrec.json", num_beams="20"),
        "{d}/iamrec.json: num_beams must be an integer >= 1, got '20'; " + AGAIN,
    ),
    "max-length-a-float": (
        _edit_json("iamrec.json", data__max_length=1.5),
        "{d}/iamrec.json: data.max_length must be an integer >= 1, got 1.5; " + AGAIN,
    ),
    "future-format": (
        _edit_json("iamrec.json", format=2),
        "{d}/iamrec.json: format 2 is not 1, the export format this iamrec reads; " + AGAIN,
    ),
    "no-tokenizer": (
        lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        "{d}/tokenizer_config.json is missing: {d} holds no tokenizer; " + AGAIN,
    ),
    "no-vocabulary": (
        _write("tokenizer.json", None),
        "{d}/tokenizer.json is missing (nor is there tokenizer.model or vocab.json): {d} holds no tokenizer "
        "vocabulary; " + AGAIN,
    ),
    "garbage-weights": (
        _write("model.safetensors", b"\x00" * 64),
        "{d}/model.safetensors cannot be read as safetensors weights (",
    ),
    "truncated-weights": (
        _truncate("model.safetensors"),
        "{d}/model.safetensors cannot be read as safetensors weights (",
    ),
    "no-weights": (
        _write("model.safetensors", None),
        "{d}/model.safetensors is missing: {d} holds no model weights; " + AGAIN,
    ),
    "config-not-json": (_write("config.json", b"{"), "{d}/config.json cannot be read as JSON ("),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_export_file_is_named(case, exported, tmp_path):
    edit, sentence = MALFORMED[case]
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    edit(folder)
    before = tree(folder)
    code, err = cli([], lambda _: guarded(lambda: Recommender.from_exported(folder)))
    assert code == 2
    assert one_sentence(err).startswith("iamrec: error: " + sentence.format(d=folder)), err
    assert tree(folder) == before  # read only


# ----------------------------------------------------------------------- --ckpt_path best without one


@pytest.mark.parametrize("command", ["test", "predict"])
def test_best_without_a_best_checkpoint_says_how_to_get_one(command, trained, processed_dir, tmp_path):
    root = _run_copy(trained, tmp_path / "run")
    before = tree(root)
    code, err = cli([command, *tiny(processed_dir, root), "--ckpt_path=best"], main)
    assert code == 2
    assert one_sentence(err) == (
        f"iamrec: error: {command} --ckpt_path best: there is no checkpoint {root}/checkpoints/best.ckpt (a fit "
        "writes it after each validation that improves its monitored metric, so only a fit with validation "
        "has one: trainer.limit_val_batches > 0 and best_checkpoint.save_top_k >= 1); run such a fit, or "
        "pass --ckpt_path last or a checkpoint file."
    )
    assert tree(root) == before
