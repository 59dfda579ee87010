"""Run directories -> tables: exact mean/std, best marking, IAM gain, p-values equal to scipy, missing cells."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from iamrec.results import (
    aggregate,
    build_report,
    collect_runs,
    gains,
    main,
    missing_cells,
    paired_test,
    significance,
    to_markdown,
)

METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")
RUNS = {
    ("ml", "iam", 0): (0.30, 0.40, 0.50, 0.20, 0.25, 0.28),
    ("ml", "iam", 1): (0.40, 0.44, 0.50, 0.22, 0.27, 0.30),
    ("ml", "sasrec", 0): (0.32, 0.38, 0.52, 0.18, 0.22, 0.25),
    ("ml", "sasrec", 1): (0.28, 0.42, 0.56, 0.20, 0.24, 0.27),
    ("ml", "popular", 0): (0.10, 0.15, 0.25, 0.05, 0.07, 0.09),
    ("toys", "popular", 0): (0.01, 0.02, 0.03, 0.01, 0.01, 0.02),
}
# Per-user ranks (users 1..6; sasrec also has user 7, which IAM never evaluated -> not paired).
RANKS = {
    ("iam", 0): {1: 0, 2: 1, 3: -1, 4: 3, 5: 0, 6: 12},
    ("iam", 1): {1: 0, 2: 2, 3: -1, 4: 3, 5: 1, 6: 5},
    ("sasrec", 0): {1: 1, 2: 4, 3: -1, 4: 9, 5: 0, 6: -1, 7: 0},
    ("sasrec", 1): {1: 3, 2: 2, 3: 8, 4: -1, 5: 2, 6: 11, 7: 0},
}


def write_runs(root: Path) -> Path:
    for (dataset, method, seed), values in RUNS.items():
        run = root / dataset / method / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "test_metrics.json").write_text(
            json.dumps(
                {**dict(zip(METRICS, values)), "users": 6, "invalid_rate": 0.0, "note": "text is ignored"}
            )
        )
        if dataset == "ml" and (method, seed) in RANKS:
            ranks = RANKS[method, seed]
            pd.DataFrame({"user_id": list(ranks), "rank": list(ranks.values())}).to_parquet(
                run / "predictions.parquet"
            )
    (root / "ml" / "hatllm").mkdir()
    (root / "ml" / "hatllm" / "MISSING").write_text("needs a GPU")
    (root / "ml" / "sasrec" / "seed2").mkdir()  # an unfinished run: no test_metrics.json
    return root


def test_collect_and_aggregate_exact(tmp_path: Path) -> None:
    runs = collect_runs(write_runs(tmp_path))
    assert len(runs) == 6 and "note" not in runs.columns
    assert runs[["dataset", "method", "seed"]].values.tolist()[:2] == [["ml", "iam", 0], ["ml", "iam", 1]]
    agg = aggregate(runs).set_index(["dataset", "method"])
    iam, sasrec = agg.loc[("ml", "iam")], agg.loc[("ml", "sasrec")]
    assert iam["seeds"] == 2 and agg.loc[("ml", "popular"), "seeds"] == 1
    assert iam["HR@5_mean"] == pytest.approx(0.35) and iam["HR@5_std"] == pytest.approx(0.07071067811865474)
    assert iam["HR@20_std"] == 0.0
    assert sasrec["HR@20_mean"] == pytest.approx(0.54) and sasrec["HR@20_std"] == pytest.approx(
        0.028284271247461926  # |0.52 - 0.56| / sqrt(2)
    )
    assert math.isnan(agg.loc[("ml", "popular"), "HR@5_std"])  # one seed: std undefined


def test_gain_and_best_marking(tmp_path: Path) -> None:
    agg = aggregate(collect_runs(write_runs(tmp_path)))
    g = gains(agg, "ml")
    # Best baseline is sasrec everywhere: 0.35/0.30, 0.42/0.40, 0.50/0.54, 0.21/0.19, 0.26/0.23, 0.29/0.26.
    expected = [1 / 6, 0.05, -0.04 / 0.54, 0.02 / 0.19, 0.03 / 0.23, 0.03 / 0.26]
    assert [g[m] for m in METRICS] == pytest.approx(expected)
    md = to_markdown(agg)
    ml_table = md.split("## toys")[0]
    iam_row = next(line for line in ml_table.splitlines() if line.startswith("| iam |"))
    sasrec_row = next(line for line in ml_table.splitlines() if line.startswith("| sasrec |"))
    assert "**0.3500 ± 0.0707**" in iam_row and "**0.5400 ± 0.0283**" in sasrec_row
    assert "0.5000 ± 0.0000" in iam_row and "**0.5000" not in iam_row  # HR@20: IAM not best
    assert iam_row.count("**") == 2 * 5 and sasrec_row.count("**") == 2
    assert (
        "| gain of iam vs best baseline | | +16.67% | +5.00% | -7.41% | +10.53% | +13.04% | +11.54% |" in md
    )
    assert "| popular | 1 | **0.0100** |" in md  # toys: single method, single seed -> no ± part
    assert md.index("| popular |") < md.index("| sasrec |") < md.index("| iam |")
    assert "__" in to_markdown(agg, best_marker="__")


def _ndcg10(r: int) -> float:
    return 1 / math.log2(r + 2) if 0 <= r < 10 else 0.0


def test_significance_matches_scipy(tmp_path: Path) -> None:
    runs = collect_runs(write_runs(tmp_path))
    agg = aggregate(runs)
    sig = significance(runs, agg).set_index("metric")
    assert set(sig["baseline"]) == {"sasrec"} and set(sig["dataset"]) == {"ml"}
    users = range(1, 7)
    iam = np.array([np.mean([_ndcg10(RANKS["iam", s][u]) for s in (0, 1)]) for u in users])
    base = np.array([np.mean([_ndcg10(RANKS["sasrec", s][u]) for s in (0, 1)]) for u in users])
    row = sig.loc["NDCG@10"]
    assert row["n"] == 6
    assert row["t_pvalue"] == pytest.approx(stats.ttest_rel(iam, base).pvalue, rel=1e-12)
    assert row["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(iam, base).pvalue, rel=1e-12)
    assert row["mean_diff"] == pytest.approx((iam - base).mean())
    hr = lambda runs_of: np.array([np.mean([0 <= runs_of[s][u] < 10 for s in (0, 1)]) for u in users])  # noqa: E731
    a, b = hr({s: RANKS["iam", s] for s in (0, 1)}), hr({s: RANKS["sasrec", s] for s in (0, 1)})
    assert sig.loc["HR@10", "t_pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert math.isnan(paired_test(np.ones(3), np.ones(3))["wilcoxon_pvalue"])  # no differences
    assert "paired t-test p = " in to_markdown(agg, significance_df=sig.reset_index())


def test_missing_cells_listed_with_commands(tmp_path: Path) -> None:
    root = write_runs(tmp_path)
    expected = {
        "ml/hatllm": "iamrec test --config configs/table2/ml_hatllm.yaml",
        "ml/iam": "iamrec test --config configs/table2/ml_iam.yaml",  # present -> not listed
        "toys/iam": "iamrec test --config configs/table2/toys_iam.yaml",
    }
    missing = missing_cells(root, expected).set_index("cell")
    assert sorted(missing.index) == ["ml/hatllm", "toys/iam"]
    assert missing.loc["ml/hatllm", "reason"] == "needs a GPU"
    assert missing.loc["ml/hatllm", "command"] == expected["ml/hatllm"]
    assert missing.loc["toys/iam", "reason"] == "no finished run"
    md = to_markdown(aggregate(collect_runs(root)), missing=missing.reset_index())
    assert "| toys/iam | no finished run | `iamrec test --config configs/table2/toys_iam.yaml` |" in md


def test_cli_writes_md_csv_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_runs(tmp_path / "runs")
    (tmp_path / "expected.json").write_text(json.dumps({"toys/iam": "make reproduce-table2"}))
    out = tmp_path / "out" / "table2"
    main(["--root", str(root), "--out", str(out), "--expected", str(tmp_path / "expected.json")])
    md = Path(f"{out}.md").read_text()
    assert "## ml" in md and "Wilcoxon" in md and "make reproduce-table2" in md
    csv = pd.read_csv(f"{out}.csv")
    assert set(csv["method"]) == {"iam", "sasrec", "popular"} and "NDCG@10_std" in csv.columns
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    assert "## ml" in capsys.readouterr().out
    # No runs at all: still a report listing what is missing.
    (tmp_path / "empty").mkdir()
    text = build_report(tmp_path / "empty", tmp_path / "o2", {"ml/iam": "cmd"})
    assert "ml/iam" in text


def test_run_folder_round_trip(tmp_path: Path, capsys) -> None:
    """What a test stage writes (`write_test_outputs`) is what reproduce copies up and results reads."""
    import os

    from iamrec import run_folder as rf

    run = rf.seed_dir(tmp_path, "ml", "iam", 3)
    assert run == tmp_path / "ml" / "iam" / "seed3"
    metrics = {**dict(zip(METRICS, RUNS["ml", "iam", 0])), "users": 2, "invalid_rate": 0.0}
    preds = pd.DataFrame(
        {
            "sample_index": [4, 9],
            "user_id": [1, 2],
            "target": [7, 8],
            "rank": [0, -1],
            "top_items": [[7], [3]],
        }
    )
    for version in (0, 1):  # two test stages; the newer one is copied up
        out = run / "lightning_logs" / f"version_{version}"
        rf.write_test_outputs(out, {**metrics, "HR@5": 0.1 * (version + 1)}, preds, method="iam")
        os.utime(out / rf.METRICS_FILE, (1000 + version, 1000 + version))
    printed = capsys.readouterr().out
    assert "iam" in printed and "HR@20" in printed and "NDCG@5" in printed  # K read from the metrics
    assert rf.latest_test_outputs(run) == run / "lightning_logs" / "version_1"
    assert not rf.is_done(run) and not rf.has_results(tmp_path / "ml" / "sasrec")
    rf.copy_test_outputs(rf.latest_test_outputs(run), run)
    rf.mark_done(run, {"profile": "cpu", "seconds": 1.5})
    assert rf.is_done(run) and rf.read_done(run) == {"profile": "cpu", "seconds": 1.5}
    runs = collect_runs(tmp_path)
    assert runs[["dataset", "method", "seed"]].values.tolist() == [["ml", "iam", 3]]
    assert runs.loc[0, "HR@5"] == pytest.approx(0.2) and runs.loc[0, "users"] == 2
    assert rf.read_predictions(run, ["user_id", "rank"]).to_dict("list") == {
        "user_id": [1, 2],
        "rank": [0, -1],
    }
    with pytest.raises(ValueError, match="user_id"):
        rf.write_test_outputs(tmp_path / "bad", metrics, preds.drop(columns="user_id"))
    with pytest.raises(FileNotFoundError, match="no test_metrics.json"):
        rf.latest_test_outputs(tmp_path / "ml" / "causal")


def test_every_iam_row_is_paired_with_causal_and_never_counts_as_a_baseline(tmp_path: Path) -> None:
    """Table 2 holds IAM twice (masked layers `iam`, added sublayers `added_iam`): each is tested against
    the causal LLM, and added_iam, even when best, is never IAM's 'best baseline'."""
    root = write_runs(tmp_path)
    extra = {
        "causal": {1: 2, 2: 2, 3: 0, 4: -1, 5: 1, 6: 4},
        "added_iam": {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0},
    }
    for method, ranks in extra.items():
        run = root / "ml" / method / "seed0"
        run.mkdir(parents=True)
        (run / "test_metrics.json").write_text(json.dumps({m: 0.9 for m in METRICS} | {"users": 6}))
        pd.DataFrame({"user_id": list(ranks), "rank": list(ranks.values())}).to_parquet(
            run / "predictions.parquet"
        )
    runs = collect_runs(root)
    agg = aggregate(runs)
    sig = significance(runs, agg)
    pairs = set(zip(sig["method"], sig["baseline"]))
    assert pairs == {("iam", "causal"), ("added_iam", "causal")}  # causal (0.9) is the best baseline
    row = sig[(sig["method"] == "added_iam") & (sig["metric"] == "NDCG@10")].iloc[0]
    a = np.array([_ndcg10(extra["added_iam"][u]) for u in range(1, 7)])
    b = np.array([_ndcg10(extra["causal"][u]) for u in range(1, 7)])
    assert row["mean_diff"] == pytest.approx((a - b).mean())
    md = to_markdown(agg, significance_df=sig)
    assert "- added_iam vs causal, per-user NDCG@10" in md
    assert md.index("| added_iam |") < md.index("| iam |")  # the IAM rows last, `iam` at the bottom
