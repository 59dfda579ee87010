"""Using a trained model: `iamrec predict`, the `Recommender` API, unknown titles, `iamrec export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from iamrec.attention import ItemAttentionConfig
from iamrec.data import IAMDataModule
from iamrec.data.histories import Catalogue, UnknownItemError
from iamrec.lit_module import IAMRecModule
from iamrec.model import LoraConfig, load_tokenizer
from iamrec.model.export import ITEM_ATTENTION_FILE, export_model, load_exported


def _cli(args: list[str], monkeypatch) -> int:
    """`iamrec ARGS` in this process (a subprocess would pay seconds of imports); its exit status."""
    from iamrec.cli import main

    monkeypatch.setattr(sys, "argv", ["iamrec"])
    try:
        main(args)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


@pytest.fixture(scope="module")
def trained(processed_dir, tmp_path_factory) -> Path:
    """A run folder with a 2-step full fine-tuning checkpoint of the tiny model."""
    root = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    args = ["fit", "--config", "configs/tiny.yaml", f"--data.data_dir={processed_dir}"]
    args += [f"--trainer.default_root_dir={root}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    args += ["--model.warmup_steps=1", "--trainer.enable_progress_bar=false"]
    try:
        assert _cli(args, mp) == 0
    finally:
        mp.undo()
    return root


def test_unknown_title_names_the_closest_catalogue_titles():
    catalogue = Catalogue(["Toy Story (1995)", "Heat (1995)", "Babe (1995)", "Casino (1995)", "Babe (1995)"])
    with pytest.raises(UnknownItemError) as err:
        catalogue.resolve(["Heat (1995)", "toy stroy (1995)"])
    assert "unknown title 'toy stroy (1995)'" in str(err.value)
    assert "closest catalogue titles: 'Toy Story (1995)'" in str(err.value)
    with pytest.raises(UnknownItemError, match=r"item id 5 is not in the catalogue \(ids 0\.\.4\)"):
        catalogue.resolve([5])
    with pytest.raises(UnknownItemError, match="neither an item title"):
        catalogue.resolve([True])
    # titles and ids mix; a shared title is its smallest id (the prompt holds only the title)
    assert catalogue.resolve(["Babe (1995)", 1, " Casino (1995) "]) == (2, 1, 3)


def test_predict_over_a_histories_file_reports_the_bad_line_and_answers_the_others(
    trained, processed_dir, tmp_path, monkeypatch, capsys
):
    histories = tmp_path / "histories.jsonl"
    lines = [
        {"user": "alice", "history": ["Toy Story (1995)", "GoldenEye (1995)"]},
        {"user": 7, "history": ["Toy Stroy (1995)", "Babe (1995)"]},
        {"history": [0, 4, 21]},  # item ids; 21 is the second "Babe (1995)"
    ]
    histories.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["predict", "--config", "configs/tiny.yaml", f"--data.data_dir={processed_dir}"]
    args += [f"--trainer.default_root_dir={trained}", "--ckpt_path=last", f"--data.predict_file={histories}"]
    args += ["--recommend.top_k=5", "--trainer.enable_progress_bar=false"]
    assert _cli(args, monkeypatch) == 1  # some lines failed, the others got results
    err = capsys.readouterr().err
    assert (
        f"{histories} line 2: unknown title 'Toy Stroy (1995)'; closest catalogue titles: 'Toy Story" in err
    )
    assert "1 of 3 histories got no recommendations" in err and "Traceback" not in err
    out = [json.loads(x) for x in next(trained.rglob("recommendations.jsonl")).read_text().splitlines()]
    assert [r["line"] for r in out] == [1, 2, 3]
    assert out[1] == {"line": 2, "user": 7, "error": err.split("line 2: ")[1].splitlines()[0]}
    assert out[0]["user"] == "alice" and out[2]["user"] is None
    assert out[2]["history"] == ["Toy Story (1995)", "Copycat (1995)", "Babe (1995)"]
    for r in (out[0], out[2]):
        recs = r["recommendations"]
        assert len(recs) == 5 and len({x["title"] for x in recs}) == 5
        assert [x["score"] for x in recs] == sorted((x["score"] for x in recs), reverse=True)

    # The Python API builds the same prompts and decodes the same way: the same items and scores.
    from iamrec.recommend import Recommender

    rec = Recommender.from_checkpoint(trained / "checkpoints" / "last.ckpt")  # data_dir from the checkpoint
    api = rec.recommend_batch([lines[0]["history"], lines[2]["history"]], k=5)
    for got, want in zip(api, (out[0], out[2])):
        assert [(r.item_id, r.title) for r in got] == [
            (x["item_id"], x["title"]) for x in want["recommendations"]
        ]
        assert [r.score for r in got] == pytest.approx(
            [x["score"] for x in want["recommendations"]], abs=1e-5
        )
    assert rec.recommend(["Toy Story (1995)", "GoldenEye (1995)"], k=3) == api[0][:3]
    with pytest.raises(UnknownItemError, match=r"history 1: unknown title 'Heat \(1995\)'; closest"):
        rec.recommend_batch([["Babe (1995)"], ["Heat (1995)"]])
    with pytest.raises(ValueError, match="k=21 must lie in 1..num_beams=20"):
        rec.recommend([0], k=21)

    # exclude_history: the same ranking without the history's titles (API and CLI alike)
    every = rec.recommend_batch([lines[0]["history"], lines[2]["history"]], k=20)
    kept = rec.recommend_batch([lines[0]["history"], lines[2]["history"]], k=5, exclude_history=True)
    for all_recs, got, want in zip(every, kept, (out[0], out[2])):
        assert [r for r in all_recs if r.title not in want["history"]][:5] == got
        assert not {r.title for r in got} & set(want["history"])
    assert any(r.title in want["history"] for recs, want in zip(every, (out[0], out[2])) for r in recs)
    args.append("--recommend.exclude_history=true")
    assert _cli(args, monkeypatch) == 1
    newest = max(trained.rglob("recommendations.jsonl"), key=lambda f: f.stat().st_mtime)
    lines_out = [json.loads(x) for x in newest.read_text().splitlines()]
    for r, got in zip((lines_out[0], lines_out[2]), kept):
        assert [x["item_id"] for x in r["recommendations"]] == [g.item_id for g in got]


def test_export_cli_writes_a_folder_that_loads_back_as_the_trained_model(trained, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert (
        _cli(
            ["export", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--out", str(out)],
            monkeypatch,
        )
        == 0
    )
    assert json.loads((out / ITEM_ATTENTION_FILE).read_text())["schedule"] == "iam"
    from iamrec.recommend import Recommender

    exported = Recommender.from_exported(out)
    original = Recommender.from_checkpoint(trained)
    history = ["Toy Story (1995)", "Copycat (1995)"]
    assert exported.recommend(history, k=5) == original.recommend(history, k=5)
    # exporting again into a folder that is not empty is refused with one sentence, exit status 2
    assert _cli(["export", "--ckpt_path", str(trained), "--out", str(out)], monkeypatch) == 2


def _logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            segment_ids=batch["segment_ids"],
        ).logits


@pytest.mark.parametrize("lora", [LoraConfig(r=4, alpha=8), None], ids=["lora", "full"])
def test_exported_and_reloaded_logits_equal_the_modules(lora, processed_dir, tmp_path):
    torch.manual_seed(0)
    module = IAMRecModule(backbone="tiny", attention=ItemAttentionConfig("iam"), lora=lora)
    module.configure_model()
    module.eval()
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a real effect to merge
        for name, p in module.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05)
    dm = IAMDataModule(str(processed_dir), "tiny", batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    want = _logits(module.model, batch)
    if lora is not None:
        with module.model.disable_adapter():
            base = _logits(module.model, batch)
        assert (want - base).abs().max() > 1e-3  # the adapters matter, so a lost merge would show

    export_model(module.model, load_tokenizer("tiny"), ItemAttentionConfig("iam"), tmp_path / "x")
    model, tokenizer, settings = load_exported(tmp_path / "x")
    got = _logits(model, batch)
    assert settings["lora_merged"] is (lora is not None) and tokenizer.pad_token_id is not None
    if lora is None:
        assert torch.equal(got, want)  # the same weights through the same code
    else:
        # W + (alpha/r) B A merged into one matrix rounds differently from the two-path LoRA sum
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # without segment_ids the reloaded model is causal: the item-aware mask changed the logits
    with torch.inference_mode():
        causal = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    assert (causal - got)[mask].abs().max() > 1e-3
