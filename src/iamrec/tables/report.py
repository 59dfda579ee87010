"""A table's report: the only writer of ``<out>.md`` (with ``<out>.csv`` and ``<out>.png`` from
`iamrec.results`), and the ``# Measured:`` header lines of the cell configs.

`reproduce` writes its report through `table_report` (what is finished, what is left, what failed) and a
merge of sittings through `merged_report`; both put a header over `iamrec.results.build_report`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iamrec import run_folder
from iamrec.results import aggregate, build_report, collect_runs
from iamrec.tables.plan import PROFILES, TableRun, command, plan


def write_report(
    root: str | Path, out: str | Path, expected: Mapping[str, str], header: str, tail: str = ""
) -> str:
    """The report of every finished run under `root` (``<out>.md`` with `header` and `tail`, ``.csv``,
    ``.png``: `iamrec.results.build_report`); returns the markdown."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return build_report(root, out, dict(expected), header=header, tail=tail)


def _title(table: str, profile: str, seeds: Sequence[int]) -> str:
    return (
        f"# {table}: profile `{profile}` ({PROFILES[profile].about}), seeds {' '.join(map(str, seeds))}\n\n"
    )


def table_report(
    run: TableRun, expected: Mapping[str, str], left: Sequence[str] = (), failed: Sequence[str] = ()
) -> str:
    """The report of a `reproduce` run: what is finished, with the cell-seeds left and failed."""
    budget = f" within a budget of {run.minutes:g} min" if run.minutes is not None else ""
    header = _title(run.table, run.profile, run.seeds) + (
        f"Produced by `{run.command()}`{budget} from the runs under `{run.root}`.\n\n"
    )
    tail = []
    if left:
        tail += ["## Left for another sitting", ""]
        tail += [f"- {item}" for item in left]
        tail += ["", f"Continue (finished cell-seeds are skipped): `{run.command(run.minutes)}`", ""]
    if failed:
        tail += ["## Failed", ""] + [f"- {item}" for item in failed] + [""]
    return write_report(run.root, run.out, expected, header, "\n".join(tail))


def merged_report(
    profile: str,
    table: str,
    datasets: Sequence[str],
    seeds: Sequence[int],
    root: Path,
    out: Path,
    sittings: str,
    continue_with: str,
) -> Path:
    """The report of a table built up over several sittings (`iamrec.tables.archive.merge`)."""
    cells = plan(table, datasets)
    expected = {c.name: command(table, profile, [c.dataset], seeds) for c in cells}
    header = _title(table, profile, seeds) + (
        f"Merged by `python -m iamrec.session merge` from {sittings}; the runs are under `{root}`.\n\n"
    )
    left = [f"{c.name} seed{s}" for s in seeds for c in cells if not run_folder.is_done(c.run_dir(root, s))]
    tail = ""
    if left:
        tail = "## Not finished in any sitting\n\n" + "\n".join(f"- {x}" for x in left)
        tail += (
            f"\n\nContinue on a GPU machine with `{continue_with}`, or here with "
            f"`{command(table, profile, datasets, seeds)}`.\n"
        )
    write_report(root, out, expected, header, tail)
    return Path(f"{out}.md")


# ------------------------------------------------------------------------------- config headers


def hardware() -> str:
    """A short description of this machine for config headers: the GPU's name, else the CPU's cores."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        name = models[0] if models else name
    return f"{os.cpu_count()}-core CPU ({name})"


def measured_line(row: dict[str, Any], profile: str, seeds: Sequence[int], minutes: float | None) -> str:
    """The ``# Measured:`` header line of a cell config, from its aggregated runs (mean ± std over seeds)."""

    def cell(metric: str) -> str:
        mean, std = row[f"{metric}_mean"], row.get(f"{metric}_std")
        return f"{metric} {mean:.4f}" + (f" ± {std:.4f}" if std is not None and std == std else "")

    took = f", {minutes:.1f} min per seed" if minutes is not None else ""
    return (
        f"# Measured ({time.strftime('%Y-%m-%d')}, profile {profile}, seeds {' '.join(map(str, seeds))}, "
        f"{hardware()}{took}): {', '.join(cell(m) for m in ('HR@10', 'NDCG@10', 'HR@20', 'NDCG@20'))}, "
        f"{int(row['users_mean'])} test samples"
    )


def _mean_minutes(dirs: Sequence[Path]) -> float | None:
    """Mean wall time (minutes) of the finished runs among `dirs`, from their `DONE` records."""
    done = [run_folder.read_done(d) for d in dirs if run_folder.is_done(d)]
    seconds = [d.get("seconds") for d in done if d is not None]
    seconds = [x for x in seconds if x is not None]
    return sum(seconds) / len(seconds) / 60 if seconds else None


def _replace_measured(config: Path, line: str) -> None:
    text = config.read_text().splitlines()
    at = next((i for i, t in enumerate(text) if t.startswith("# Measured")), None)
    if at is None:
        raise ValueError(f"{config} has no '# Measured' header line to update.")
    end = at + 1
    while end < len(text) and text[end].startswith("#   "):  # the line's continuation lines
        end += 1
    text[at:end] = [line]
    config.write_text("\n".join(text) + "\n")


def update_headers(
    table: str, datasets: Sequence[str], seeds: Sequence[int], profile: str, root: str | Path
) -> list[Path]:
    """Rewrite the ``# Measured:`` line of every cell config that has finished runs; returns the files."""
    root = Path(root)
    runs = collect_runs(root)
    runs = runs[runs["seed"].isin(list(seeds))]
    if runs.empty:
        return []
    agg = aggregate(runs)
    changed = []
    for cell in plan(table, datasets):
        rows = agg[(agg["dataset"] == cell.dataset) & (agg["method"] == cell.method)]
        if rows.empty:
            continue
        minutes = _mean_minutes([cell.run_dir(root, s) for s in seeds])
        cell_seeds = sorted(
            runs.loc[(runs["dataset"] == cell.dataset) & (runs["method"] == cell.method), "seed"]
        )
        _replace_measured(cell.config, measured_line(rows.iloc[0].to_dict(), profile, cell_seeds, minutes))
        changed.append(cell.config)
    return changed
