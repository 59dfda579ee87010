"""Aggregate finished runs into paper-style tables: mean ± std over seeds, best marked, IAM's gain, p-values.

Reads the runs root of :mod:`iamrec.run_folder` (one seed folder per table cell and seed, with its test
metrics and per-sample ranks; ``MISSING`` markers for cells that were not run): ``iamrec test``,
SASRec's test stage and ``python -m iamrec.baselines.popular --out`` write those files.

Conventions:
- std is the sample standard deviation over seeds (ddof=1); with one seed it is undefined and omitted.
- "best" is the highest mean per metric column within a dataset (ties are all marked).
- The gain row is ``(IAM - best baseline) / best baseline`` per column, the best baseline being the best
  non-IAM method *for that column*.
- Significance: IAM against the best baseline on ``test_metric`` (default NDCG@10), paired over test users:
  per-user HR@10 / NDCG@10 are derived from ranks, averaged over a user's samples and over seeds, and the
  users both methods evaluated are compared with ``scipy.stats.ttest_rel`` and ``scipy.stats.wilcoxon``.

Run ``python -m iamrec.results --help``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from iamrec import run_folder

TABLE_METRICS: tuple[str, ...] = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")
IAM = "iam"
# Other readings of IAM shown as rows of their own (never a baseline); each is tested against `causal`.
IAM_ROWS = (IAM, "added_iam")
_KEYS = ["dataset", "method"]


# ------------------------------------------------------------------------------------------ collect


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per finished run (a seed folder holding its test metrics).

    Columns: ``dataset``, ``method``, ``seed`` (int), ``path`` (str), then every numeric entry of
    ``test_metrics.json``. Seed folders without the file (unfinished runs) are skipped; see
    :func:`missing_cells`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results root {root} does not exist; run the experiments first.")
    rows = []
    for dataset, method, seed, seed_dir in run_folder.finished_runs(root):
        metrics = run_folder.read_metrics(seed_dir)
        row = {"dataset": dataset, "method": method, "seed": seed, "path": str(seed_dir)}
        row.update(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        rows.append(row)
    columns = ["dataset", "method", "seed", "path"]
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(rows).sort_values(["dataset", "method", "seed"], ignore_index=True)


def aggregate(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds per (dataset, method).

    Returns one row per (dataset, method) with ``seeds`` and ``<metric>_mean`` / ``<metric>_std`` for
    each metric (default: every metric column of ``df`` except ``users``/``seed``).
    """
    if metrics is None:
        skip = {"dataset", "method", "seed", "path"}
        metrics = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    grouped = df.groupby(_KEYS, sort=True)
    out = grouped.size().rename("seeds").to_frame()
    for m in metrics:
        out[f"{m}_mean"] = grouped[m].mean()
        out[f"{m}_std"] = grouped[m].std(ddof=1)
    return out.reset_index()


def missing_cells(root: str | Path, expected_cells: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Cells that have no result, with the command that would produce them.

    Args:
        root: the results root (``<root>/<dataset>/<method>/seed<k>/``).
        expected_cells: ``{"<dataset>/<method>" or "<dataset>/<method>/seed<k>": command}``; a cell is
            missing when no run below it wrote its test metrics.

    Every ``MISSING`` marker under ``root`` is also listed (its text is the reason), with the command of
    the expected cell containing it when known. Columns: ``cell``, ``reason``, ``command``.
    """
    root = Path(root)
    expected_cells = dict(expected_cells or {})
    rows: dict[str, dict[str, str]] = {}

    def command_for(cell: str) -> str:
        # The most specific expected key that is the cell itself or one of its parents.
        keys = [k for k in expected_cells if cell == k or cell.startswith(k.rstrip("/") + "/")]
        return expected_cells[max(keys, key=len)] if keys else ""

    for cell, reason in run_folder.missing_markers(root):
        rows[cell] = {"cell": cell, "reason": reason or "marked MISSING", "command": command_for(cell)}
    for cell, command in expected_cells.items():
        cell = cell.strip("/")
        if cell in rows:
            continue
        if not run_folder.has_results(root / cell):
            rows[cell] = {"cell": cell, "reason": "no finished run", "command": command}
    return pd.DataFrame(list(rows.values()), columns=["cell", "reason", "command"])


# ------------------------------------------------------------------------------------ significance


def per_user_scores(predictions: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per-user HR@k and NDCG@k from ranks, averaged over the user's rows (samples and seeds).

    ``predictions`` needs ``user_id`` and ``rank``; returns columns ``HR@k``, ``NDCG@k`` indexed by user_id.
    """
    rank = predictions["rank"].to_numpy()
    hit = (rank >= 0) & (rank < k)
    ndcg = np.where(hit, 1.0 / np.log2(np.clip(rank, 0, None) + 2.0), 0.0)
    per_row = pd.DataFrame({"user_id": predictions["user_id"].to_numpy(), f"HR@{k}": hit.astype(float)})
    per_row[f"NDCG@{k}"] = ndcg
    return per_row.groupby("user_id").mean()


def load_predictions(runs: pd.DataFrame, dataset: str, method: str) -> pd.DataFrame:
    """All seeds' per-sample predictions of one cell, concatenated (columns user_id, rank, seed)."""
    cell = runs[(runs["dataset"] == dataset) & (runs["method"] == method)]
    frames = []
    for seed, path in zip(cell["seed"], cell["path"]):
        predictions = run_folder.read_predictions(path, columns=["user_id", "rank"])
        if predictions is not None:
            frames.append(predictions.assign(seed=seed))
    if not frames:
        raise FileNotFoundError(
            f"no {run_folder.PREDICTIONS_FILE} for {dataset}/{method}; rerun its test stage."
        )
    return pd.concat(frames, ignore_index=True)


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of ``a`` vs ``b`` (same users, same order).

    Returns ``{"t_pvalue", "wilcoxon_pvalue", "mean_diff", "n"}``; a p-value is NaN where the test is
    undefined (fewer than two users, or all differences zero).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a - b
    out = {"mean_diff": float(diff.mean()) if len(diff) else math.nan, "n": len(diff)}
    if len(diff) < 2 or np.all(diff == 0):
        return {**out, "t_pvalue": math.nan, "wilcoxon_pvalue": math.nan}
    return {
        **out,
        "t_pvalue": float(stats.ttest_rel(a, b).pvalue),
        "wilcoxon_pvalue": float(stats.wilcoxon(a, b).pvalue),
    }


def best_method(agg: pd.DataFrame, dataset: str, metric: str, exclude: str | None = IAM) -> str | None:
    """The baseline with the highest mean ``metric`` on ``dataset`` (``exclude`` and every IAM row left
    out), or None."""
    out = {exclude, *IAM_ROWS} - {None}
    rows = agg[(agg["dataset"] == dataset) & ~agg["method"].isin(out)].dropna(subset=[f"{metric}_mean"])
    if rows.empty:
        return None
    return str(rows.loc[rows[f"{metric}_mean"].idxmax(), "method"])


def significance(
    runs: pd.DataFrame,
    agg: pd.DataFrame,
    test_metric: str = "NDCG@10",
    iam: str = IAM,
    also: Sequence[str] = ("causal",),
) -> pd.DataFrame:
    """IAM vs the best baseline (by ``test_metric``) per dataset, paired over test users; then IAM vs each
    method in ``also`` that has runs (default: the same LLM with standard attention, the matched control);
    then every other IAM row (`IAM_ROWS`, e.g. ``added_iam``) vs the methods of ``also``.

    One row per dataset, IAM row, baseline and per-user metric (HR@10, NDCG@10): ``dataset``, ``method``,
    ``baseline``, ``metric``, ``n`` (users both evaluated), ``mean_diff``, ``t_pvalue``,
    ``wilcoxon_pvalue``.
    """
    rows = []
    pairs = []
    for dataset in sorted(agg["dataset"].unique()):
        present = set(agg.loc[agg["dataset"] == dataset, "method"])
        if iam in present:
            best = best_method(agg, dataset, test_metric, exclude=iam)
            extra = [m for m in also if m in present and m not in (best, iam)]
            pairs += [(dataset, iam, b) for b in ([best] if best else []) + extra]
        for row in (m for m in IAM_ROWS if m != iam and m in present):
            pairs += [(dataset, row, b) for b in also if b in present]
    for dataset, method, baseline in pairs:
        try:
            scores = [per_user_scores(load_predictions(runs, dataset, m), k=10) for m in (method, baseline)]
        except FileNotFoundError:
            # No per-user ranks for one side: report the pairing as undefined instead of failing the table.
            nan = {"n": 0, "mean_diff": math.nan, "t_pvalue": math.nan, "wilcoxon_pvalue": math.nan}
            rows += [
                {"dataset": dataset, "method": method, "baseline": baseline, "metric": m, **nan}
                for m in ("HR@10", "NDCG@10")
            ]
            continue
        users = scores[0].index.intersection(scores[1].index)  # pair only users both evaluated
        for metric in ("HR@10", "NDCG@10"):
            a, b = (s.loc[users, metric].to_numpy() for s in scores)
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "baseline": baseline,
                    "metric": metric,
                    **paired_test(a, b),
                }
            )
    columns = ["dataset", "method", "baseline", "metric", "n", "mean_diff", "t_pvalue", "wilcoxon_pvalue"]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------- render


def _method_order(methods: Sequence[str], iam: str) -> list[str]:
    # Baselines alphabetically, then the other IAM rows, IAM last, as in the paper's tables.
    rows = [m for m in IAM_ROWS if m != iam and m in methods]
    return sorted(m for m in methods if m != iam and m not in rows) + rows + ([iam] if iam in methods else [])


def _cell(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def gains(
    agg: pd.DataFrame, dataset: str, metrics: Sequence[str] = TABLE_METRICS, iam: str = IAM
) -> dict[str, float]:
    """Relative gain of IAM over the best baseline of each metric column: (iam - best) / best."""
    rows = agg[agg["dataset"] == dataset].set_index("method")
    out = {}
    for m in metrics:
        best = best_method(agg, dataset, m, exclude=iam)
        if iam in rows.index and best is not None:
            ref = rows.loc[best, f"{m}_mean"]
            out[m] = (rows.loc[iam, f"{m}_mean"] - ref) / ref if ref else math.nan
    return out


def to_markdown(
    agg: pd.DataFrame,
    best_marker: str = "**",
    metrics: Sequence[str] = TABLE_METRICS,
    iam: str = IAM,
    significance_df: pd.DataFrame | None = None,
    missing: pd.DataFrame | None = None,
    digits: int = 4,
) -> str:
    """Markdown: one table per dataset (mean ± std, best per column wrapped in ``best_marker``), a gain
    row for IAM over the best baseline, the paired-test p-values, and the list of missing cells."""
    metrics = [m for m in metrics if f"{m}_mean" in agg.columns]
    lines: list[str] = [
        f"Mean ± std over seeds (sample std); best per column marked {best_marker}…{best_marker}.",
        "",
    ]
    for dataset in sorted(agg["dataset"].unique()):
        rows = agg[agg["dataset"] == dataset].set_index("method")
        best = {m: rows[f"{m}_mean"].max() for m in metrics}
        lines += [f"## {dataset}", "", "| method | seeds | " + " | ".join(metrics) + " |"]
        lines.append("| --- | --- | " + " | ".join("---" for _ in metrics) + " |")
        for method in _method_order(list(rows.index), iam):
            cells = []
            for m in metrics:
                mean, std = rows.loc[method, f"{m}_mean"], rows.loc[method, f"{m}_std"]
                text = _cell(mean, std, digits)
                cells.append(f"{best_marker}{text}{best_marker}" if mean == best[m] else text)
            lines.append(f"| {method} | {rows.loc[method, 'seeds']} | " + " | ".join(cells) + " |")
        gain = gains(agg, dataset, metrics, iam)
        if gain:
            cells = [f"{gain[m]:+.2%}" if m in gain and not math.isnan(gain[m]) else "–" for m in metrics]
            lines.append(f"| gain of {iam} vs best baseline | | " + " | ".join(cells) + " |")
        lines.append("")
        if significance_df is not None:
            for r in significance_df[significance_df["dataset"] == dataset].itertuples():
                lines.append(
                    f"- {r.method} vs {r.baseline}, per-user {r.metric} over {r.n} test users: mean difference "
                    f"{r.mean_diff:+.4f}, paired t-test p = {r.t_pvalue:.3g}, "
                    f"Wilcoxon signed-rank p = {r.wilcoxon_pvalue:.3g}"
                )
            lines.append("")
    if missing is not None and not missing.empty:
        lines += ["## Missing cells", "", "| cell | reason | command |", "| --- | --- | --- |"]
        for r in missing.itertuples():
            lines.append(
                f"| {r.cell} | {r.reason} | `{r.command}` |" if r.command else f"| {r.cell} | {r.reason} | |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(agg: pd.DataFrame, path: str | Path, metrics: Sequence[str] = TABLE_METRICS, iam: str = IAM) -> Path:
    """Save a PNG: one panel per dataset, grouped bars per metric, one bar per method, std error bars."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if f"{m}_mean" in agg.columns]
    datasets = sorted(agg["dataset"].unique())
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(6 * max(len(datasets), 1), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = agg[agg["dataset"] == dataset].set_index("method")
        methods = _method_order(list(rows.index), iam)
        width = 0.8 / len(methods)
        x = np.arange(len(metrics))
        for i, method in enumerate(methods):
            means = rows.loc[method, [f"{m}_mean" for m in metrics]].to_numpy(float)
            stds = np.nan_to_num(rows.loc[method, [f"{m}_std" for m in metrics]].to_numpy(float))
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=method)
        ax.set_xticks(x, metrics)
        ax.set_title(dataset)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_report(
    root: str | Path,
    out: str | Path,
    expected_cells: Mapping[str, str] | None = None,
    test_metric: str = "NDCG@10",
    iam: str = IAM,
    header: str = "",
    tail: str = "",
) -> str:
    """Collect ``root``, write ``<out>.md`` (`header` first, `tail` last), ``<out>.csv`` (aggregate) and
    ``<out>.png``; return the markdown. The only writer of a report's ``.md``."""
    runs = collect_runs(root)
    missing = missing_cells(root, expected_cells)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if runs.empty:
        text = f"No finished runs under {root}.\n\n" + to_markdown(aggregate(runs, []), missing=missing)
    else:
        agg = aggregate(runs)
        sig = significance(runs, agg, test_metric, iam)
        text = to_markdown(agg, iam=iam, significance_df=sig, missing=missing)
        agg.to_csv(f"{out}.csv", index=False)
        plot(agg, f"{out}.png", iam=iam)
    text = header + text
    if tail:
        text = text.rstrip("\n") + "\n\n" + tail
    Path(f"{out}.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """Aggregate run directories into a paper-style table (markdown, CSV and a PNG chart)."""
    parser = argparse.ArgumentParser(prog="python -m iamrec.results", description=main.__doc__)
    parser.add_argument("--root", required=True, help="runs root: <root>/<dataset>/<method>/seed<k>/")
    parser.add_argument("--out", required=True, help="output prefix; writes <out>.md, <out>.csv, <out>.png")
    parser.add_argument(
        "--expected",
        default=None,
        help='JSON file {"<dataset>/<method>": "command that produces it"} listing the cells to expect',
    )
    parser.add_argument("--test-metric", default="NDCG@10", help="metric that picks the best baseline")
    parser.add_argument("--iam", default=IAM, help="method name of IAM in the runs layout")
    args = parser.parse_args(argv)
    expected = json.loads(Path(args.expected).read_text()) if args.expected else None
    print(build_report(args.root, args.out, expected, args.test_metric, args.iam))


if __name__ == "__main__":
    main()
