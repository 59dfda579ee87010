"""The `iamrec` command line end to end on the tiny config (random model, seconds)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

CONFIGS = sorted(str(p) for p in Path("configs").glob("*.yaml"))  # table cells: tests/test_reproduce.py
IAMREC = [sys.executable, "-m", "iamrec.cli"]


# One torch thread per process: on a shared 2-core machine OpenMP's spinning threads make a tiny model's
# step take seconds instead of a tenth of one.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args: list[str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(IAMREC + args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_parses(config, capsys, monkeypatch):
    """Through the real CLI, in-process (the subprocess form is exercised by the runs below)."""
    from iamrec.cli import main

    monkeypatch.setattr(sys, "argv", ["iamrec"])
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints and exits 0
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model:" in out and "data:" in out


def _tiny(processed_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/tiny.yaml",
        f"--data.data_dir={processed_dir}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--data.max_eval_samples=12",
        *extra,
    ]


def test_fit_then_test_writes_metrics_and_predictions(processed_dir, tmp_path):
    res = run(["fit", *_tiny(processed_dir, tmp_path, *_step_log(tmp_path))])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    # the learning rate of every step is logged: tiny.yaml's lr 1e-3, 2 warmup steps, cosine over 6 steps
    lrs = _train_curve(tmp_path)["train/lr"].tolist()
    assert lrs == pytest.approx(
        [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3 * (1 + 2**-0.5) / 2, 5e-4, 1e-3 * (1 - 2**-0.5) / 2]
    )
    # best.ckpt beside last.ckpt: the weights of the validation with the lowest val/loss (steps 3 and 6)
    vals = pd.read_csv(next(tmp_path.rglob("metrics.csv"))).dropna(subset=["val/loss"])
    best_step = int(vals.loc[vals["val/loss"].idxmin(), "step"]) + 1
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == best_step and "optimizer_states" in best
    res = run(["test", *_tiny(processed_dir, tmp_path), "--ckpt_path=last"])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics_file = next(tmp_path.rglob("test_metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    assert metrics["users"] == 12 and metrics["invalid_rate"] == 0.0
    for k in (1, 5, 10, 20):
        assert 0.0 <= metrics[f"NDCG@{k}"] <= metrics[f"HR@{k}"] <= 1.0
    preds = pd.read_parquet(metrics_file.parent / "predictions.parquet")
    assert len(preds) == 12 and preds["sample_index"].is_unique
    hr10 = float((preds["rank"].between(0, 9)).mean())
    assert hr10 == pytest.approx(metrics["HR@10"])
    distinct = preds["top_items"].map(lambda items: len(set(items))).mean()
    assert metrics["distinct_items"] == pytest.approx(distinct) and 1 <= distinct <= 20
    assert "most-popular" in res.stdout and "HR@10" in res.stdout
    # the adapter-or-full checkpoint rebuilds the model without the training config
    from iamrec.lit_module import IAMRecModule

    module = IAMRecModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert module.hparams.attention["schedule"] == "iam"


def test_bf16_mixed_with_bf16_base_and_fp32_adapters(processed_dir, tmp_path):
    extra = [
        "--trainer.precision=bf16-mixed",
        "--model.model_dtype=bfloat16",
        "--model.lora.r=8",
        "--trainer.max_steps=2",
        "--model.warmup_steps=1",
    ]
    res = run(["fit", *_tiny(processed_dir, tmp_path, *extra)])
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")[
        "state_dict"
    ]
    assert state and all("lora_" in k and v.dtype == torch.float32 for k, v in state.items())


def _step_log(root: Path) -> list[str]:
    """Options that log every step's train/loss and train/lr to ``<root>/.../metrics.csv``."""
    return [
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={root}",
        "--trainer.log_every_n_steps=1",
    ]


def _train_curve(root: Path) -> pd.DataFrame:
    rows = pd.read_csv(next(root.rglob("metrics.csv")))
    return rows.dropna(subset=["train/loss"]).set_index("step")[["train/loss", "train/lr"]]


def test_ddp_two_processes_equal_one_process(processed_dir, tmp_path):
    """Training: 2 processes with batch 4 each take the steps of 1 process with batch 8 (tiny.yaml), the
    same data order (`iamrec.data.sampler`) and the loss normalised by all processes' target tokens
    (`IAMRecModule.target_loss`). Evaluation: test and validation metrics of 2 processes equal 1's."""
    res = run(["fit", *_tiny(processed_dir, tmp_path / "one", *_step_log(tmp_path / "one"))])
    assert res.returncode == 0, res.stderr[-3000:]
    two = [
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--data.batch_size=4",
        *_step_log(tmp_path / "two"),
    ]
    res = run(["fit", *_tiny(processed_dir, tmp_path / "two", *two)])
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = _train_curve(tmp_path / "one"), _train_curve(tmp_path / "two")
    assert list(one.index) == list(two.index) == list(range(6))
    # Equal up to float32 summation order (other padded lengths per process, gloo's gradient all-reduce):
    # measured 5e-7 apart after 6 steps; other batches would differ by > 1e-2 from the first step on.
    assert two["train/loss"].to_numpy() == pytest.approx(one["train/loss"].to_numpy(), rel=1e-5)
    assert two["train/lr"].tolist() == one["train/lr"].tolist()
    ckpt = str(tmp_path / "one" / "checkpoints" / "last.ckpt")
    metrics = {}
    for devices in (1, 2):
        root = tmp_path / f"test{devices}"
        extra = [f"--trainer.devices={devices}", "--data.max_eval_samples=11"]
        if devices == 2:
            extra.append("--trainer.strategy=ddp")
        res = run(["test", *_tiny(processed_dir, root, *extra), f"--ckpt_path={ckpt}"])
        assert res.returncode == 0, res.stderr[-3000:]
        metrics[devices] = json.loads(next(root.rglob("test_metrics.json")).read_text())
    assert metrics[1]["users"] == metrics[2]["users"] == 11
    for key in ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@10", "NDCG@20"):
        assert metrics[1][key] == pytest.approx(metrics[2][key], abs=1e-6)
    # Validation with decoding: 11 samples over 2 ranks repeat one; it must count once, as in test.
    val = {}
    for devices in (1, 2):
        extra = [f"--trainer.devices={devices}", "--data.max_eval_samples=11", "--model.val_generate=true"]
        extra.append("--trainer.limit_val_batches=1.0")  # all 11 (tiny.yaml caps validation batches per rank)
        if devices == 2:
            extra.append("--trainer.strategy=ddp")
        res = run(
            ["validate", *_tiny(processed_dir, tmp_path / f"val{devices}", *extra), f"--ckpt_path={ckpt}"]
        )
        assert res.returncode == 0, res.stderr[-3000:]
        val[devices] = dict(re.findall(r"val/((?:HR|NDCG)@\d+)\s*\S\s*([-0-9.e]+)", res.stdout))
    assert len(val[1]) == 8 and val[1] == val[2]


@pytest.mark.parametrize(
    "option",
    ["--optimizer=torch.optim.SGD", "--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--optimizer.lr=1"],
)
def test_lightning_optimizer_options_are_refused_not_dropped(option, processed_dir, tmp_path, capsys):
    """The module's AdamW and schedule are the run's: LightningCLI's --optimizer / --lr_scheduler would
    replace them (or be replaced) silently, so they stop the command with one sentence."""
    from iamrec.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_tiny(processed_dir, tmp_path), option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and option.split("=")[0] in err and "model.lr" in err, err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data.data_dir=/nonexistent/ml100k"], "/nonexistent/ml100k"),
        (
            ["--model.attention.schedule=[intra,inter]"],
            "model.attention.schedule lists 2 layers but the backbone has 4",
        ),
        (["--model.attention.schedule=alternate"], "attention.schedule='alternate' is not a preset"),
        (["--model.backbone=Qwen/Qwen2.5-0.5B-Instruct"], "hub is not reachable"),
    ],
)
def test_bad_input_gives_one_sentence(processed_dir, tmp_path, extra, message, monkeypatch, capsys):
    """In-process through the real CLI entry (the subprocess form is exercised by the runs above)."""
    from iamrec.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("IAMREC_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["iamrec"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_tiny(processed_dir, tmp_path), *extra])
    # SystemExit(2), not the exception itself: the policy turned it into its one sentence (no traceback).
    err = capsys.readouterr().err  # Lightning's INFO lines first, then the sentence
    last = err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert last.startswith("iamrec: error: ") and message in last, err
    assert not (tmp_path / "checkpoints").exists()


def test_empty_test_split_is_reported(tmp_path):
    from tests.conftest import write_processed, write_stats

    data = write_processed(tmp_path / "d")
    samples = pd.read_parquet(data / "samples.parquet")
    samples[samples["split"] != "test"].to_parquet(data / "samples.parquet", index=False)
    write_stats(data)  # a consistent folder whose test split is empty
    res = run(["test", *_tiny(data, tmp_path / "run")])
    assert res.returncode == 2
    assert "The test split of" in res.stderr and "is empty" in res.stderr and "Traceback" not in res.stderr


def test_ckpt_path_best_names_best_ckpt(tmp_path):
    from iamrec.run_checkpoints import resolve_ckpt_path
    from iamrec.run_folder import CheckpointError

    with pytest.raises(CheckpointError, match=r"test --ckpt_path best: there is no checkpoint .*best\.ckpt"):
        resolve_ckpt_path("test", "best", str(tmp_path))  # none yet: one sentence, not Lightning's rule
    (tmp_path / "best.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("test", "best", str(tmp_path)) == str(tmp_path / "best.ckpt")
