"""`python -m iamrec.reproduce`: cell planning, profile overlays, skip/resume with DONE markers, missing
cells, the popular baseline on the LLM's test rows, and every table config parsing through the real CLIs.

No model is trained: the stage subprocesses are replaced by a fake that writes what `iamrec test` writes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from iamrec import reproduce as rp
from iamrec.run_folder import is_done
from iamrec.tables import plan as tp
from iamrec.tables import report, runner
from iamrec.tables.plan import PROFILES, TABLES, Cell, Profile, TableRun, plan, stage_commands

REPO = Path(__file__).resolve().parents[1]


def reproduce(table, datasets, seeds, profile="cpu", root=None, out=None, dry_run=False, **settings) -> str:
    """One table run (`iamrec.tables.runner.reproduce` of a `TableRun`)."""
    return runner.reproduce(TableRun(table, datasets, seeds, profile, root, out, dry_run=dry_run, **settings))


CELLS = [Cell(t, d, m) for t in TABLES for d in tp.DATASETS for m in TABLES[t]]
METRICS = {"HR@5": 0.2, "HR@10": 0.3, "HR@20": 0.4, "NDCG@5": 0.1, "NDCG@10": 0.15, "NDCG@20": 0.2}


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name paths relative to the repository root
    monkeypatch.setattr(sys, "argv", ["iamrec"])  # in-process CLI calls: no pytest arguments in sight


# ---------------------------------------------------------------------------------------- planning


def test_plan_has_one_config_per_cell(in_repo) -> None:
    cells = plan("table2", ["ml100k"])
    assert [c.method for c in cells] == ["popular", "sasrec", "causal", "hatllm", "iam", "added_iam"]
    assert [c.kind for c in cells] == ["popular", "sasrec", "llm", "llm", "llm", "llm"]
    assert cells[4].configs == (Path("configs/ml100k.yaml"), Path("configs/table2/ml100k/iam.yaml"))
    assert cells[1].configs == (Path("configs/table2/ml100k/sasrec.yaml"),)  # stand-alone SASRec config
    assert len(plan("ablation", list(tp.DATASETS))) == 15 * len(tp.DATASETS)  # PRESETS: 10 masked, 5 added
    # every shipped cell file is a planned cell and vice versa
    shipped = {
        p.relative_to("configs").with_suffix("").as_posix()
        for t in TABLES
        for p in Path("configs", t).rglob("*.yaml")
    }
    assert shipped == {f"{c.table}/{c.dataset}/{c.method}" for c in CELLS}
    with pytest.raises(FileNotFoundError, match="configs/table2/nope/popular.yaml"):
        plan("table2", ["nope"])


def test_cell_configs_state_their_schedule_and_carry_the_header(in_repo) -> None:
    for cell in CELLS:
        text = cell.config.read_text()
        assert text.startswith(f"# {cell.config.as_posix()} — "), cell.config
        assert "# Command" in text and "# Hardware/time:" in text
        # Either never run, or the line `reproduce --update-headers` writes (never a hand-typed metric).
        measured = [line for line in text.splitlines() if line.startswith("# Measured")]
        assert measured == ["# Measured: not yet run."] or (
            len(measured) == 1 and measured[0].startswith("# Measured (") and "profile " in measured[0]
        ), cell.config
        if cell.kind == "llm":
            assert yaml.safe_load(text) == {"model": {"attention": {"schedule": cell.method}}}


def test_profile_overlays_and_commands(in_repo, tmp_path: Path) -> None:
    iam, sasrec = Cell("table2", "ml100k", "iam"), Cell("table2", "ml100k", "sasrec")
    (fit, fit_argv), (test, test_argv) = stage_commands(iam, 1, tmp_path, PROFILES["cpu"])
    assert (fit, test) == ("fit", "test")
    configs = [
        "--config=configs/ml100k.yaml",
        "--config=configs/table2/ml100k/iam.yaml",
        "--config=configs/profiles/cpu.yaml",  # the profile's overlay comes last
    ]
    assert fit_argv[:7] == [sys.executable, "-m", "iamrec.cli", "fit", *configs]
    assert test_argv[:7] == [sys.executable, "-m", "iamrec.cli", "test", *configs]
    assert "--seed_everything=1" in fit_argv
    assert f"--trainer.default_root_dir={tmp_path}/ml100k/iam/seed1" in fit_argv
    assert "--ckpt_path=last" not in fit_argv and test_argv[-1] == "--ckpt_path=last"
    full_fit = stage_commands(iam, 0, tmp_path, PROFILES["full"])[0][1]
    assert not any("profiles" in a for a in full_fit) and full_fit[4:6] == configs[:2]
    # resume: an interrupted fit continues from last.ckpt; SASRec tests its best-validation checkpoint
    ckpts = tmp_path / "ml100k" / "sasrec" / "seed0" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").touch()
    (ckpts / "best-epoch=7.ckpt").touch()
    (fit_s, fit_argv), (_, test_argv) = stage_commands(sasrec, 0, tmp_path, PROFILES["cpu"])
    assert fit_argv[2] == "iamrec.baselines.sasrec" and fit_argv[-1] == "--ckpt_path=last"
    assert fit_argv[4:6] == [
        "--config=configs/table2/ml100k/sasrec.yaml",
        "--config=configs/profiles/cpu-sasrec.yaml",
    ]
    assert test_argv[-1] == f"--ckpt_path={ckpts / 'best-epoch=7.ckpt'}"
    assert stage_commands(Cell("table2", "ml100k", "popular"), 0, tmp_path, PROFILES["cpu"]) == []
    assert tp.display(fit_argv).startswith("python -m iamrec.baselines.sasrec fit --config=")


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a.b.c": value} for every leaf of a nested dict."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_resolved_config_equals_the_cli(in_repo, capsys) -> None:
    from iamrec.cli import main

    cell = Cell("ablation", "toys", "stacked")
    prof = PROFILES["cpu"]
    ours = tp.resolved_config(cell, prof)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[f"--config={c}" for c in cell.layers(prof)], "--print_config"])
    assert exit_info.value.code in (0, None)
    cli = _leaves(yaml.safe_load(capsys.readouterr().out))
    for key, value in _leaves(ours).items():
        assert cli[key] == value, key
    assert cli["model.attention.schedule"] == "stacked"
    assert cli["model.backbone"] == ".assets/models/SmolLM2-135M-Instruct"  # the cpu overlay's backbone


# The cpu profile of a Table 2 cell as it resolved when the profile was a list of CLI flags: the overlays
# must keep every value (the cell's attention and LoRA keys aside, which the overlays never set).
CPU_IAM_ML100K = {
    "seed_everything": 0,
    "trainer.max_epochs": 1,
    "trainer.precision": "32-true",
    "trainer.val_check_interval": 32,
    "trainer.limit_val_batches": 2,
    "trainer.log_every_n_steps": 10,
    "trainer.default_root_dir": "runs/ml100k",
    "trainer.accelerator": "cpu",
    "trainer.devices": 1,
    "trainer.max_steps": 64,
    "trainer.enable_model_summary": False,
    "model.backbone": ".assets/models/SmolLM2-135M-Instruct",
    "model.model_dtype": "float32",
    "model.lr": 1.0e-3,
    "model.warmup_steps": 6,
    "model.num_beams": 20,
    "data.data_dir": "data/processed/ml100k",
    "data.max_items": 10,
    "data.max_length": 256,
    "data.batch_size": 8,
    "data.eval_batch_size": 4,
    "data.bucket_by_length": False,
    "data.max_train_samples": 512,
    "data.max_eval_samples": 80,
}
CPU_SASREC_ML100K = {
    "trainer.max_epochs": 30,
    "trainer.accelerator": "cpu",
    "trainer.devices": 1,
    "data.max_eval_samples": 80,
    "data.full_validation": True,
    "data.data_dir": "data/processed/ml100k",
    "data.max_len": 50,
}


def test_cpu_profile_resolves_as_before(in_repo) -> None:
    resolved = _leaves(tp.resolved_config(Cell("table2", "ml100k", "iam"), PROFILES["cpu"]))
    # resolved by the CLI's parser, so every other key holds its class default
    assert {k: resolved[k] for k in CPU_IAM_ML100K} == CPU_IAM_ML100K
    assert isinstance(resolved["model.lr"], float)  # 1.0e-3, not YAML 1.1's string "1.0e-3"
    sasrec = _leaves(tp.resolved_config(Cell("table2", "ml100k", "sasrec"), PROFILES["cpu"]))
    assert {k: sasrec[k] for k in CPU_SASREC_ML100K} == CPU_SASREC_ML100K
    # every LLM cell of both tables gets the same cpu settings: only its attention/LoRA keys differ
    for cell in plan("table2", ["ml100k"]) + plan("ablation", ["ml100k"]):
        if cell.kind == "llm":
            leaves = _leaves(tp.resolved_config(cell, PROFILES["cpu"]))
            assert {k: leaves[k] for k in CPU_IAM_ML100K} == CPU_IAM_ML100K, cell.name
    # the overlays never choose the method: no attention key (LoRA or full fine-tuning is the profile's,
    # the same for every LLM cell: `gpu` fine-tunes fully)
    for overlay in Path("configs/profiles").glob("*.yaml"):
        model = yaml.safe_load(overlay.read_text()).get("model", {})
        assert "attention" not in model, overlay
        assert overlay.read_text().startswith(f"# {overlay.as_posix()} — "), overlay
    for profile in PROFILES.values():
        assert all(Path(f).is_file() for f in profile.llm + profile.sasrec), profile.name


# ------------------------------------------------------------------------------ running (faked)


def _fake_stages(calls: list[list[str]]):
    """Stand-in for the fit/test subprocesses: writes last.ckpt on fit and the test outputs on test."""

    def run(argv, log=None, tag=""):
        calls.append(argv)
        if log is not None:
            with open(log, "a") as f:
                f.write(f"{argv[3]} output\n")
        root = Path(next(a for a in argv if a.startswith("--trainer.default_root_dir=")).split("=", 1)[1])
        if argv[3] == "fit":
            (root / "checkpoints").mkdir(parents=True, exist_ok=True)
            (root / "checkpoints" / "last.ckpt").write_text("ckpt")
            if argv[2] == "iamrec.baselines.sasrec":
                (root / "checkpoints" / "best-epoch=3.ckpt").write_text("ckpt")
        else:
            out = root / "lightning_logs" / f"version_{len(list(root.glob('lightning_logs/*')))}"
            out.mkdir(parents=True)
            (out / "test_metrics.json").write_text(json.dumps({**METRICS, "users": 2}))
            pd.DataFrame(
                {"sample_index": [0, 1], "user_id": [0, 1], "target": [1, 2], "rank": [0, -1]}
            ).to_parquet(out / "predictions.parquet")

    return run


@pytest.fixture
def workspace(processed_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """A working folder with the real configs and the fixture dataset as ml100k; toys is absent."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "data" / "processed").mkdir(parents=True)
    (tmp_path / "data" / "processed" / "ml100k").symlink_to(processed_dir)
    monkeypatch.setattr(tp, "backbone_available", lambda spec: True)
    (tmp_path / "small.yaml").write_text("data:\n  max_eval_samples: 5\n")
    small = Profile("small", llm=(Path("small.yaml"),), sasrec=(Path("small.yaml"),), about="t")
    monkeypatch.setitem(PROFILES, "small", small)
    return tmp_path


def test_run_skips_finished_and_resumes(workspace: Path, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_call", _fake_stages(calls))
    root = workspace / "runs"
    reproduce("table2", ["ml100k"], [0, 1], "small", root=root, out=workspace / "results" / "table2")
    assert len(calls) == 5 * 2 * 2  # sasrec, causal, hatllm, iam, added_iam x 2 seeds x (fit, test)
    sasrec_test = [c for c in calls if c[2] == "iamrec.baselines.sasrec" and c[3] == "test"]
    assert sasrec_test[0][-1].endswith(
        "seed0/checkpoints/best-epoch=3.ckpt"
    )  # written by the fit just before
    for method in TABLES["table2"]:
        for seed in (0, 1):
            run_dir = root / "ml100k" / method / f"seed{seed}"
            assert is_done(run_dir) and (run_dir / "predictions.parquet").is_file()
            assert json.loads((run_dir / "DONE").read_text())["profile"] == "small"
    report = (workspace / "results" / "table2.md").read_text()
    assert "## ml100k" in report and "| iam | 2 |" in report
    assert (workspace / "results" / "table2.csv").is_file() and (
        workspace / "results" / "table2.png"
    ).is_file()

    # an interruption: seed1 of iam lost its DONE after fit finished, seed0 of causal died mid-fit
    (root / "ml100k" / "iam" / "seed1" / "DONE").unlink()
    causal = root / "ml100k" / "causal" / "seed0"
    (causal / "DONE").unlink()
    (causal / "FIT_DONE").unlink()
    calls.clear()
    plan_text = reproduce("table2", ["ml100k"], [0, 1], "small", root=root, dry_run=True)
    assert "ml100k/iam seed0: done, skipped" in plan_text and "ml100k/iam seed1: resume" in plan_text
    assert "fit (finished, skipped)" in plan_text and calls == []
    reproduce("table2", ["ml100k"], [0, 1], "small", root=root, out=workspace / "results" / "table2")
    assert [c[3] for c in calls] == ["fit", "test", "test"]  # causal fit (resumed) + test, iam test only
    assert calls[0][-1] == "--ckpt_path=last" and f"--trainer.default_root_dir={causal}" in calls[0]
    assert f"--trainer.default_root_dir={root / 'ml100k' / 'iam' / 'seed1'}" in calls[2]
    assert is_done(causal) and is_done(root / "ml100k" / "iam" / "seed1")
    # the copied outputs are the newest test run's
    assert (causal / "test_metrics.json").read_text() == (
        causal / "lightning_logs/version_1/test_metrics.json"
    ).read_text()
    with pytest.raises(ValueError, match="another profile"):
        reproduce("table2", ["ml100k"], [0], "cpu", root=root, dry_run=True)


def test_missing_dataset_is_listed_not_an_error(workspace: Path, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_call", _fake_stages(calls))
    root = workspace / "runs"
    plan_text = reproduce("table2", ["ml100k", "toys"], [0], "small", root=root, dry_run=True)
    assert "toys/iam: MISSING: no processed data (data/processed/toys/samples.parquet)" in plan_text
    assert "python -m data_prep.amazon --reviews <reviews file>" in plan_text
    assert not root.exists()  # a dry run writes nothing
    report = reproduce("table2", ["ml100k", "toys"], [0], "small", root=root, out=workspace / "r" / "t2")
    assert (root / "toys" / "sasrec" / "MISSING").is_file()
    assert "## Missing cells" in report and "| toys/popular | no processed data" in report
    assert "--output data/processed/toys" in report and "## ml100k" in report
    # an absent local backbone is missing too, with the command that fetches it
    monkeypatch.setattr(tp, "backbone_available", lambda spec: False)
    reason, command = tp.missing_inputs(Cell("table2", "ml100k", "iam"), PROFILES["cpu"])
    assert "backbone .assets/models/SmolLM2-135M-Instruct" in reason and command == "make assets"
    assert tp.missing_inputs(Cell("table2", "ml100k", "sasrec"), PROFILES["cpu"]) is None  # no backbone
    # a missing backbone on a missing dataset lists both providers
    reason, command = tp.missing_inputs(Cell("ablation", "toys", "iam"), PROFILES["full"])
    assert "Qwen/Qwen2.5-0.5B-Instruct" in reason and command.startswith("python -m data_prep.amazon")


def test_popular_scores_exactly_the_llm_test_rows(workspace: Path) -> None:
    from iamrec.data import IAMDataModule

    cell = Cell("table2", "ml100k", "popular")
    data_dir, rows = tp.popular_rows(cell, PROFILES["small"])
    dm = IAMDataModule("data/processed/ml100k", tokenizer="tiny", max_eval_samples=5, seed=0)
    dm.setup("test")
    assert data_dir == "data/processed/ml100k" and len(rows) == 5
    assert rows.tolist() == dm.datasets["test"].rows.tolist()


# ------------------------------------------------------------------------- configs parse (real CLIs)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.table}/{c.dataset}/{c.method}")
def test_every_cell_config_parses_through_its_cli(cell: Cell, in_repo, capsys) -> None:
    """Each cell's own configs (profile `full`: no overlay). The profiles' overlays are the same files for
    every cell of a kind; `test_every_overlay_parses_over_a_cell_of_each_kind` parses each of them once."""
    config = _print_config(cell, PROFILES["full"], capsys)
    if cell.kind == "llm":
        assert config["model"]["attention"]["schedule"] == cell.method
    assert config["data"]["data_dir"] == f"data/processed/{cell.dataset}"


def _print_config(cell: Cell, profile: Profile, capsys) -> dict:
    from iamrec.baselines.sasrec import main as sasrec_main
    from iamrec.cli import main as iamrec_main

    entry = sasrec_main if cell.kind == "sasrec" else iamrec_main
    args = ["fit", *[f"--config={c}" for c in cell.configs]]
    with pytest.raises(SystemExit) as exit_info:
        entry([*args, *[f"--config={c}" for c in cell.overlays(profile)], "--print_config"])
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), out.err[-2000:]
    return yaml.safe_load(out.out)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_overlay_parses_over_a_cell_of_each_kind(profile: str, in_repo, capsys) -> None:
    for cell in (Cell("table2", "ml100k", "iam"), Cell("table2", "ml100k", "sasrec")):
        config = _print_config(cell, PROFILES[profile], capsys)
        assert config["data"]["data_dir"] == "data/processed/ml100k"


def test_documented_command_exits_zero(in_repo) -> None:
    """The exact subprocess form of the header's command (one cell; the rest are checked in-process)."""
    cmd = [sys.executable, "-m", "iamrec.cli", "fit", "--config", "configs/ml100k.yaml"]
    cmd += ["--config", "configs/table2/ml100k/iam.yaml", "--print_config"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]


def test_sasrec_cli_fit_then_test_writes_the_run_files(processed_dir: Path, tmp_path: Path, in_repo) -> None:
    """SASRec's own CLI: best checkpoint kept, test writes the files iamrec.results reads (same test rows)."""
    from iamrec.baselines.sasrec import main

    args = ["--config=configs/table2/ml100k/sasrec.yaml", f"--data.data_dir={processed_dir}"]
    args += ["--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--data.max_eval_samples=5"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    main(["fit", *args])
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    main(["test", *args, f"--ckpt_path={best}"])
    out = next(tmp_path.glob("lightning_logs/version_*/test_metrics.json")).parent
    metrics = json.loads((out / "test_metrics.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    assert metrics["users"] == 5 and metrics["HR@10"] == pytest.approx(preds["rank"].between(0, 9).mean())
    assert list(preds.columns) == ["sample_index", "user_id", "target", "rank", "top_items"]
    from iamrec.data import IAMDataModule  # the same test rows the LLM cells and popular evaluate

    dm = IAMDataModule(str(processed_dir), tokenizer="tiny", max_eval_samples=5, seed=0)
    dm.setup("test")
    assert preds["sample_index"].tolist() == dm.datasets["test"].rows.tolist()


def test_update_headers_writes_the_measured_line(tmp_path: Path, monkeypatch) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # a copy: the real configs stay untouched
    root = tmp_path / "runs"
    for seed, hr in ((0, 0.10), (1, 0.20)):
        run_dir = root / "ml100k" / "iam" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        metrics = {"HR@10": hr, "NDCG@10": hr / 2, "HR@20": hr * 2, "NDCG@20": hr, "users": 80}
        (run_dir / "test_metrics.json").write_text(json.dumps(metrics))
        (run_dir / "DONE").write_text(json.dumps({"profile": "cpu", "seconds": 600 + 60 * seed}))
    changed = report.update_headers("table2", ["ml100k"], [0, 1], "cpu", root)
    assert changed == [Path("configs/table2/ml100k/iam.yaml")]  # the only cell with runs
    lines = changed[0].read_text().splitlines()
    measured = [line for line in lines if line.startswith("# Measured")]
    assert len(measured) == 1 and "profile cpu, seeds 0 1" in measured[0]
    assert "10.5 min per seed" in measured[0]  # (600 + 660) / 2 s
    assert "HR@10 0.1500 ± 0.0707" in measured[0] and "80 test samples" in measured[0]  # sample std
    body = {"model": {"attention": {"schedule": "iam"}}}
    assert yaml.safe_load(changed[0].read_text()) == body  # the YAML body is kept
    untouched = (tmp_path / "configs/table2/ml100k/causal.yaml").read_text()
    assert untouched == (REPO / "configs/table2/ml100k/causal.yaml").read_text()


def test_methods_restrict_what_runs(workspace: Path) -> None:
    plan_text = reproduce(
        "table2", ["ml100k"], [0], "small", root=workspace / "runs", dry_run=True, methods=["iam"]
    )
    assert "ml100k/iam seed0: run" in plan_text and "ml100k/causal seed0" not in plan_text
    cpu = reproduce("table2", ["ml100k"], [0], "cpu", root=workspace / "cpu", dry_run=True)
    assert "    fit: iamrec fit --config=configs/ml100k.yaml --config=configs/table2/ml100k/iam.yaml " in cpu
    assert cpu.count("--config=configs/profiles/cpu.yaml ") == 8  # fit + test of 4 LLM cells
    assert cpu.count("--config=configs/profiles/cpu-sasrec.yaml ") == 2
    with pytest.raises(ValueError, match="unknown method"):
        reproduce("table2", ["ml100k"], [0], "small", root=workspace / "runs", dry_run=True, methods=["foo"])


def test_ablation_reuses_finished_table2_cells_of_the_same_settings(workspace: Path, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_call", _fake_stages(calls))
    runs = workspace / "runs"
    reproduce("table2", ["ml100k"], [0], "small", root=runs / "table2", methods=["iam", "causal"])
    calls.clear()
    methods = ["causal", "iam", "hatllm", "split"]
    plan_text = reproduce(
        "ablation", ["ml100k"], [0], "small", root=runs / "ablation", dry_run=True, methods=methods
    )
    assert f"ml100k/iam seed0: same settings as {runs / 'table2/ml100k/iam/seed0'} (finished)" in plan_text
    assert "ml100k/hatllm seed0: run" in plan_text  # not finished in table2: trained here
    reproduce(
        "ablation", ["ml100k"], [0], "small", root=runs / "ablation", out=workspace / "abl", methods=methods
    )
    trained = sorted(next(a for a in c if a.startswith("--config=configs/ablation")) for c in calls)
    assert trained == 2 * ["--config=configs/ablation/ml100k/hatllm.yaml"] + 2 * [
        "--config=configs/ablation/ml100k/split.yaml"
    ]  # fit + test each; causal and iam not trained
    for method in ("causal", "iam"):
        done = json.loads((runs / "ablation/ml100k" / method / "seed0/DONE").read_text())
        assert done["reused_from"] == str(runs / "table2/ml100k" / method / "seed0")
        assert (runs / "ablation/ml100k" / method / "seed0/test_metrics.json").read_text() == (
            runs / "table2/ml100k" / method / "seed0/test_metrics.json"
        ).read_text()
    # another profile's twin is not reused
    assert runner.twin_run(Cell("ablation", "ml100k", "iam"), 0, runs / "ablation", PROFILES["cpu"]) is None


# ------------------------------------------------------------------ profiles gpu and tiny, time budget


def test_gpu_and_tiny_overlays_parse_through_the_clis(in_repo, capsys) -> None:
    from iamrec.baselines.sasrec import main as sasrec_main
    from iamrec.cli import main as iamrec_main

    for profile, backbone in (("gpu", ".assets/models/SmolLM2-135M-Instruct"), ("tiny", "tiny")):
        for cell in (Cell("table2", "ml100k", "iam"), Cell("table2", "ml100k", "sasrec")):
            entry = sasrec_main if cell.kind == "sasrec" else iamrec_main
            with pytest.raises(SystemExit) as exit_info:
                entry(["fit", *[f"--config={c}" for c in cell.layers(PROFILES[profile])], "--print_config"])
            out = capsys.readouterr()
            assert exit_info.value.code in (0, None), out.err[-2000:]
            config = yaml.safe_load(out.out)
            if cell.kind == "llm":
                assert (
                    config["model"]["backbone"] == backbone
                    and config["model"]["attention"]["schedule"] == "iam"
                )
            assert config["data"]["max_eval_samples"] == (None if profile == "gpu" else 6)
    assert tp.resolved_config(Cell("table2", "ml100k", "iam"), PROFILES["gpu"])["model"]["lora"] is None


def test_gpu_dry_run_prints_the_plan_with_its_overlays(workspace: Path, capsys) -> None:
    rp.main(["table2", "--profile", "gpu", "--seeds", "0", "--dry-run"])
    out = capsys.readouterr().out
    assert "# table2, profile gpu (one GPU: full fine-tuning" in out and "root results/gpu/runs/table2" in out
    assert out.count("--config=configs/profiles/gpu.yaml ") == 8  # fit + test of 4 LLM cells
    assert out.count("--config=configs/profiles/gpu-sasrec.yaml ") == 2
    assert not Path("results").exists()  # a dry run writes nothing
    # reports: results/<profile>/<table>; the committed cpu reports stay at results/<table>
    assert tp.default_out("gpu", "table2") == Path("results/gpu/table2")
    assert tp.default_out("cpu", "ablation") == Path("results/ablation")
    assert tp.default_root("tiny", "table2") == Path("results/runs/tiny/table2")


def test_a_failed_cell_seed_does_not_stop_the_others(workspace: Path, monkeypatch) -> None:
    calls: list[list[str]] = []
    fake = _fake_stages(calls)

    def run(argv, log=None, tag=""):
        if argv[3] == "fit" and "--config=configs/table2/ml100k/hatllm.yaml" in argv:
            raise subprocess.CalledProcessError(1, argv)
        return fake(argv, log)

    monkeypatch.setattr(runner, "_call", run)
    with pytest.raises(runner.CellFailed, match=r"1 cell-seed\(s\) failed: ml100k/hatllm seed0") as info:
        reproduce("table2", ["ml100k"], [0], "small", root=workspace / "runs", out=workspace / "t2")
    assert is_done(workspace / "runs/ml100k/iam/seed0")  # the cell after the failed one ran
    assert "## Failed" in info.value.report and "| iam | 1 |" in (workspace / "t2.md").read_text()


def test_tiny_profile_time_budget_stops_then_a_rerun_continues(workspace: Path, capsys) -> None:
    """Real runs (tiny backbone, fixture data): --minutes 0 starts nothing but reports what is left; a rerun
    finishes; a cell-seed whose expected time (its finished seeds' DONE) does not fit is left."""
    args = ["table2", "--profile", "tiny", "--methods", "popular,iam"]
    root, report = Path("results/runs/tiny/table2"), Path("results/tiny/table2.md")
    rp.main([*args, "--seeds", "0", "--minutes", "0"])
    text = report.read_text()
    assert "## Left for another sitting" in text and "- ml100k/iam seed0 (the time budget is spent)" in text
    assert "- ml100k/popular seed0 (the time budget is spent)" in text
    cont = (
        "python -m iamrec.reproduce table2 --profile tiny --datasets ml100k --seeds 0 --methods popular,iam"
    )
    assert f"Continue (finished cell-seeds are skipped): `{cont} --minutes 0`" in text
    assert "No finished runs" in text and not any(root.rglob("DONE"))
    assert "ml100k/iam seed0 (the time budget is spent)" in capsys.readouterr().out  # printed too

    rp.main([*args, "--seeds", "0"])  # the rerun: both cell-seeds run
    for method in ("popular", "iam"):
        assert is_done(root / "ml100k" / method / "seed0")
        assert (root / "ml100k" / method / "seed0" / "predictions.parquet").is_file()
    text = report.read_text()
    assert "| iam | 1 |" in text and "| popular | 1 |" in text and "Left for another sitting" not in text

    # projected from the finished seeds: popular ~1 s fits half a minute; iam, whose recorded fit ran at
    # 4 steps in 600 s (its DONE's timing), does not
    for method, seconds in (("popular", 1), ("iam", 600)):
        done = root / "ml100k" / method / "seed0" / "DONE"
        record = {**json.loads(done.read_text()), "seconds": seconds}
        if method == "iam":
            assert record["timing"]["fit_steps"] == 4 and record["timing"]["test_samples"] > 0  # recorded
            record["timing"].update(fit_seconds=600.0, wall_seconds=610.0)
        done.write_text(json.dumps(record))
    rp.main([*args, "--seeds", "0", "1", "--minutes", "0.5"])
    assert is_done(root / "ml100k/popular/seed1") and not is_done(root / "ml100k/iam/seed1")
    text = report.read_text()
    assert "| popular | 2 |" in text and "| iam | 1 |" in text
    assert re.search(r"- ml100k/iam seed1 \(projected 10\.\d min, 0\.\d min left", text), text
    assert f"`{cont.replace('--seeds 0', '--seeds 0 1')} --minutes 0.5`" in text


def test_jobs_run_cell_seeds_side_by_side(workspace: Path, monkeypatch) -> None:
    """--jobs 3: up to three cell-seeds run at once (never more), in seed-major start order, each stage's
    output in its seed folder's reproduce.log; a failure is still reported and does not stop the rest."""
    calls: list[list[str]] = []
    fake = _fake_stages(calls)
    lock, alive, most, started = threading.Lock(), [0], [0], []

    def run(argv, log=None, tag=""):
        with lock:
            alive[0] += 1
            most[0] = max(most[0], alive[0])
            if argv[3] == "fit":
                started.append(next(a for a in argv if a.startswith("--trainer.default_root_dir=")))
        time.sleep(1.0)  # long enough for the others to start beside it
        try:
            if (
                argv[3] == "fit"
                and "--config=configs/table2/ml100k/hatllm.yaml" in argv
                and "seed1" in str(log)
            ):
                raise subprocess.CalledProcessError(1, argv)
            return fake(argv, log)
        finally:
            with lock:
                alive[0] -= 1

    monkeypatch.setattr(runner, "_call", run)
    root = workspace / "runs"
    with pytest.raises(runner.CellFailed, match=r"1 cell-seed\(s\) failed: ml100k/hatllm seed1"):
        reproduce("table2", ["ml100k"], [0, 1], "small", root=root, out=workspace / "t2", jobs=3)
    assert most[0] == 3  # side by side, never more than --jobs
    order = [s.split("/ml100k/")[1] for s in started]
    logged = "fit output\ntest output\n"
    assert set(order[:4]) == {"sasrec/seed0", "causal/seed0", "hatllm/seed0", "iam/seed0"}  # seed-major
    for method in ("sasrec", "causal", "hatllm", "iam"):
        for seed in (0, 1):
            run_dir = root / "ml100k" / method / f"seed{seed}"
            ok = (method, seed) != ("hatllm", 1)  # the failing fake raises before it writes output
            assert is_done(run_dir) == ok and (not ok or (run_dir / "reproduce.log").read_text() == logged)
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        reproduce("table2", ["ml100k"], [0], "small", root=root, jobs=0)


def test_an_interrupted_parallel_run_stops_its_stages_and_reports(workspace: Path, monkeypatch) -> None:
    """SIGTERM-like interruption while cell-seeds run side by side: every stage process is terminated
    (none left running), and the report lists the unfinished cell-seeds."""
    sleepers: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(argv, **kw):  # the real _call machinery, with a stage that would run for a minute
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw)
        sleepers.append(proc)
        return proc

    monkeypatch.setattr(runner.subprocess, "Popen", popen)

    def interrupt_once_both_run() -> None:  # not a fixed delay: planning time varies with the machine's load
        deadline = time.time() + 60
        while len(sleepers) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=interrupt_once_both_run, daemon=True)
    previous = signal.signal(signal.SIGTERM, rp._terminated)
    timer.start()
    try:
        with pytest.raises(SystemExit):
            reproduce(
                "table2", ["ml100k"], [0], "small", root=workspace / "runs", out=workspace / "t2", jobs=2
            )
    finally:
        timer.join()
        signal.signal(signal.SIGTERM, previous)
    assert len(sleepers) == 2 and all(p.poll() is not None for p in sleepers)  # both stopped, none left
    text = (workspace / "t2.md").read_text()
    assert "ml100k/causal seed0 (stopped before it finished" in text and "| popular | 1 |" in text
