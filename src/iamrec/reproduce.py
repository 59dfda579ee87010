"""Run whole tables: every cell x seed, resumable, then one report (`make reproduce-table2|reproduce-ablation`).

    python -m iamrec.reproduce table2|ablation --profile cpu|full --datasets ml100k,toys --seeds 0 1 2
        [--methods iam,causal] [--dry-run] [--update-headers] [--root results/runs/<profile>/<table>] [--out results/<table>]

A **cell** is one (dataset, method) of a table; its config is `configs/<table>/<dataset>/<method>.yaml`, a
small file layered over the dataset's base config `configs/<dataset>.yaml` (LLM cells; LightningCLI merges
later `--config` files over earlier ones). A **profile** is a list of CLI overrides applied to every cell:
`cpu` shrinks the run to the demo's size (and the local SmolLM2 backbone) so it finishes on a 2-core CPU,
`full` adds nothing (the configs are the paper-scale GPU setting).

Each cell x seed runs in `<root>/<dataset>/<method>/seed<k>/` (the layout `iamrec.results` reads):

- LLM cells (`causal`, `iam`, `hatllm`, ablation schedules): `iamrec fit`, then `iamrec test --ckpt_path last`
  (subprocesses), `--seed_everything=<k>`, `--trainer.default_root_dir=<seed dir>`;
- `sasrec`: the same two stages through `python -m iamrec.baselines.sasrec` (its own LightningCLI; the test
  stage loads the best-validation checkpoint);
- `popular`: `evaluate_popular` in-process on exactly the LLM cells' test subset (same `data.max_eval_samples`
  and `data.seed`, chosen by the data module's own `subset_rows`).

The run's `test_metrics.json` and `predictions.parquet` are copied up into the seed folder, then a `DONE`
marker (JSON: profile, commands, seconds) is written. A rerun skips seeds with `DONE`; an interrupted fit
resumes from `checkpoints/last.ckpt` (`--ckpt_path last`); a finished fit (`FIT_DONE`) is not redone.
A cell whose settings equal a finished cell of the other table (`causal`, `iam` and `hatllm` are in both
Table 2 and the ablation: same resolved config, profile and seed, sibling root `<root>/../<other table>`)
is not trained again: its results are copied and its `DONE` names the run they came from (`reused_from`).
Cells whose processed data or backbone are absent are not errors: they get a `MISSING` marker and are
listed in the report with the command that would provide them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iamrec.attention.schedule import PRESETS

TABLES: dict[str, tuple[str, ...]] = {
    "table2": ("popular", "sasrec", "causal", "hatllm", "iam"),
    "ablation": PRESETS,  # every layer schedule preset
}
DATASETS: tuple[str, ...] = ("ml100k", "toys", "sports", "beauty")
CONFIG_ROOT = Path("configs")
CPU_BACKBONE = ".assets/models/SmolLM2-135M-Instruct"
IAMREC = (sys.executable, "-m", "iamrec.cli")
SASREC = (sys.executable, "-m", "iamrec.baselines.sasrec")


@dataclass(frozen=True)
class Profile:
    """CLI overrides applied to every cell of a run; `llm` also defines popular's test subset."""

    name: str
    llm: tuple[str, ...]
    sasrec: tuple[str, ...]
    about: str


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        "cpu",
        llm=(
            # ~10 min per cell x seed on a 2-core CPU (3 LLM cells x 3 seeds in ~1.5 h): a CPU-only setting,
            # not the paper's scale; 64 steps x batch 8 is about twice the demo's training samples
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.max_steps=64",
            "--trainer.val_check_interval=32",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=10",
            "--trainer.enable_model_summary=false",
            f"--model.backbone={CPU_BACKBONE}",
            "--model.model_dtype=float32",
            "--model.lr=1.0e-3",
            "--model.warmup_steps=6",
            "--data.max_length=256",
            "--data.batch_size=8",
            "--data.eval_batch_size=4",
            "--data.bucket_by_length=false",
            "--data.max_train_samples=512",
            "--data.max_eval_samples=80",
        ),
        sasrec=(
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_epochs=30",
            "--data.max_eval_samples=80",  # the LLM cells' test users (same rows, same data.seed)
            "--data.full_validation=true",  # early stopping on all 9,905 valid samples, not 80
        ),
        about="2-core CPU: 64 steps x batch 8 (512 train samples), 80 test samples, SmolLM2-135M",
    ),
    "full": Profile("full", llm=(), sasrec=(), about="paper scale on GPUs: the configs as written"),
}

# How to provide a dataset that is not prepared yet.
DATA_COMMANDS = {"ml100k": "make data-ml100k"}
AMAZON_COMMAND = "python -m data_prep.amazon --reviews <reviews file> --meta <meta file> --output {data_dir}"


@dataclass(frozen=True)
class Cell:
    """One table cell: which configs to layer and which runner executes it."""

    table: str
    dataset: str
    method: str

    @property
    def kind(self) -> str:
        return self.method if self.method in ("popular", "sasrec") else "llm"

    @property
    def config(self) -> Path:
        return CONFIG_ROOT / self.table / self.dataset / f"{self.method}.yaml"

    @property
    def configs(self) -> tuple[Path, ...]:
        """`--config` files in order: the dataset base then the cell (SASRec's cell stands alone)."""
        if self.kind == "sasrec":
            return (self.config,)
        return (CONFIG_ROOT / f"{self.dataset}.yaml", self.config)

    def overrides(self, profile: Profile) -> tuple[str, ...]:
        return profile.sasrec if self.kind == "sasrec" else profile.llm

    def run_dir(self, root: Path, seed: int) -> Path:
        return Path(root) / self.dataset / self.method / f"seed{seed}"

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.method}"


def plan(table: str, datasets: Sequence[str]) -> list[Cell]:
    """Every cell of `table` for `datasets`, in table order; an error naming a missing config file."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of {sorted(TABLES)}.")
    cells = [Cell(table, d, m) for d in datasets for m in TABLES[table]]
    absent = [str(c.config) for c in cells if not c.config.is_file()]
    if absent:
        raise FileNotFoundError(f"no config for {absent[0]} (known datasets: {', '.join(DATASETS)}).")
    return cells


# ------------------------------------------------------------------------------------ resolve configs


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def resolved_config(cell: Cell, profile: Profile) -> dict[str, Any]:
    """The cell's config files merged in order plus the profile's `--a.b=value` overrides (what the CLI
    sees, minus its defaults); tested against `--print_config`."""
    config: dict[str, Any] = {}
    for path in cell.configs:
        config = _merge(config, yaml.safe_load(path.read_text()) or {})
    for item in cell.overrides(profile):
        key, value = item.removeprefix("--").split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return config


def missing_inputs(cell: Cell, profile: Profile) -> tuple[str, str] | None:
    """(reason, command that provides it) when the cell's data or backbone is absent, else None."""
    config = resolved_config(cell, profile)
    data_dir = config.get("data", {}).get("data_dir", f"data/processed/{cell.dataset}")
    reasons, commands = [], []
    if not (Path(data_dir) / "samples.parquet").is_file():
        reasons.append(f"no processed data ({data_dir}/samples.parquet)")
        commands.append(DATA_COMMANDS.get(cell.dataset, AMAZON_COMMAND.format(data_dir=data_dir)))
    if cell.kind == "llm":
        backbone = str(config.get("model", {}).get("backbone", "tiny"))
        if not backbone_available(backbone):
            reasons.append(f"backbone {backbone} not available (no local folder, hub unreachable)")
            commands.append(
                "make assets"
                if backbone.startswith(".assets/")
                else f"set model.backbone to a local copy of {backbone}"
            )
    return ("; ".join(reasons), " && ".join(commands)) if reasons else None


def backbone_available(spec: str) -> bool:
    """A local folder, `tiny`, a hub id already in the HF cache, or a hub that answers."""
    from iamrec.model.loading import _hub_reachable, _looks_like_hub_id

    if spec == "tiny" or Path(spec).is_dir():
        return True
    if not _looks_like_hub_id(spec):
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec, "config.json"), str) or _hub_reachable()


# ------------------------------------------------------------------------------------------ commands


def stage_commands(cell: Cell, seed: int, root: Path, profile: Profile) -> list[tuple[str, list[str]]]:
    """[(stage, argv)] for one cell x seed (empty for `popular`, which runs in-process)."""
    if cell.kind == "popular":
        return []
    run_dir = cell.run_dir(root, seed)
    entry = SASREC if cell.kind == "sasrec" else IAMREC
    common = [f"--config={c}" for c in cell.configs] + list(cell.overrides(profile))
    common += [f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}"]
    fit = [*entry, "fit", *common]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        fit.append("--ckpt_path=last")  # resume an interrupted fit
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt")) if cell.kind == "sasrec" else []
    test = [*entry, "test", *common, f"--ckpt_path={best[-1] if best else 'last'}"]
    return [("fit", fit), ("test", test)]  # the order run_seed relies on


def popular_rows(cell: Cell, profile: Profile) -> tuple[str, Any]:
    """(data_dir, test rows of samples.parquet) exactly as `IAMDataModule` picks the LLM's test subset."""
    from iamrec.data.datamodule import _EVAL_SEED_OFFSET
    from iamrec.data.dataset import load_items, load_samples, subset_rows

    data = resolved_config(cell, profile).get("data", {})
    data_dir, seed = data["data_dir"], int(data.get("seed", 0))
    rows = load_samples(data_dir, len(load_items(data_dir))).rows("test")
    return data_dir, subset_rows(rows, data.get("max_eval_samples"), seed + _EVAL_SEED_OFFSET["test"])


def display(argv: Sequence[str]) -> str:
    """The command as a person would type it (`iamrec ...` instead of `python -m iamrec.cli`)."""
    text = shlex.join(argv)
    return text.replace(shlex.join(IAMREC), "iamrec").replace(
        shlex.join(SASREC), "python -m iamrec.baselines.sasrec"
    )


def is_done(run_dir: Path) -> bool:
    return (run_dir / "DONE").is_file() and (run_dir / "test_metrics.json").is_file()


# -------------------------------------------------------------------------------------------- running


def _latest_test_outputs(run_dir: Path) -> Path:
    found = sorted(
        run_dir.glob("lightning_logs/version_*/test_metrics.json"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise FileNotFoundError(f"the test stage wrote no test_metrics.json under {run_dir}/lightning_logs.")
    return found[-1].parent


def run_seed(cell: Cell, seed: int, root: Path, profile: Profile) -> None:
    """Run (or resume) one cell x seed and flatten its outputs into the seed folder, then mark DONE."""
    run_dir = cell.run_dir(root, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    start, done_cmds = time.time(), []
    if cell.kind == "popular":
        from iamrec.baselines.popular import evaluate_popular

        data_dir, rows = popular_rows(cell, profile)
        evaluate_popular(data_dir, "test", sample_indices=rows, out_dir=run_dir)
        done_cmds.append(f"evaluate_popular({data_dir!r}, test rows: {len(rows)})")
    else:
        for i, stage in enumerate(("fit", "test")):
            if stage == "fit" and (run_dir / "FIT_DONE").is_file():
                continue
            # built per stage: the test stage names the checkpoint the fit stage just wrote (SASRec's best)
            argv = stage_commands(cell, seed, root, profile)[i][1]
            print(f"[reproduce] {cell.name} seed{seed} {stage}: {display(argv)}", flush=True)
            subprocess.run(argv, check=True)
            if stage == "fit":
                (run_dir / "FIT_DONE").write_text("")
            done_cmds.append(display(argv))
        out = _latest_test_outputs(run_dir)
        for name in ("test_metrics.json", "predictions.parquet"):
            shutil.copy2(out / name, run_dir / name)
    record = {"profile": profile.name, "commands": done_cmds, "seconds": round(time.time() - start, 1)}
    (run_dir / "DONE").write_text(json.dumps(record, indent=2) + "\n")


def twin_run(cell: Cell, seed: int, root: Path, profile: Profile) -> Path | None:
    """A finished run of the same settings in another table (sibling root `root.parent / <table>`), or None."""
    for table, methods in TABLES.items():
        twin = Cell(table, cell.dataset, cell.method)
        if table == cell.table or cell.method not in methods or not twin.config.is_file():
            continue
        run_dir = twin.run_dir(Path(root).parent / table, seed)
        if not is_done(run_dir) or json.loads((run_dir / "DONE").read_text()).get("profile") != profile.name:
            continue
        if resolved_config(twin, profile) == resolved_config(cell, profile):
            return run_dir
    return None


def reuse_seed(run_dir: Path, twin: Path) -> None:
    """Copy a finished twin run's outputs into `run_dir` and mark it DONE with where they came from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("test_metrics.json", "predictions.parquet"):
        shutil.copy2(twin / name, run_dir / name)
    record = {**json.loads((twin / "DONE").read_text()), "reused_from": str(twin)}
    (run_dir / "DONE").write_text(json.dumps(record, indent=2) + "\n")


def _check_profile(run_dir: Path, profile: Profile) -> None:
    done = run_dir / "DONE"
    if done.is_file() and json.loads(done.read_text() or "{}").get("profile", profile.name) != profile.name:
        raise ValueError(f"{run_dir} holds a finished run of another profile; use a different --root.")


def reproduce(
    table: str,
    datasets: Sequence[str],
    seeds: Sequence[int],
    profile: str = "cpu",
    root: str | Path | None = None,
    out: str | Path | None = None,
    dry_run: bool = False,
    methods: Sequence[str] | None = None,
) -> str:
    """Plan, run what is not finished, and write the report; returns the plan (dry run) or the markdown.

    `methods` restricts what is *run* to those rows (default: all); the report covers every finished run
    under `root`.
    """
    prof = PROFILES[profile]
    unknown = sorted(set(methods or ()) - set(TABLES[table])) if table in TABLES else []
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for {table}; choose from {', '.join(TABLES[table])}.")
    root = Path(root or f"results/runs/{profile}/{table}")
    out = Path(out or f"results/{table}")
    rerun = (
        f"python -m iamrec.reproduce {table} --profile {profile} --datasets {{dataset}} "
        f"--seeds {' '.join(map(str, seeds))} --root {root}"
    )
    lines = [f"# {table}, profile {profile} ({prof.about}), seeds {list(seeds)}, root {root}"]
    expected: dict[str, str] = {}
    present: list[Cell] = []
    for cell in plan(table, datasets):
        missing = missing_inputs(cell, prof)
        marker = root / cell.dataset / cell.method / "MISSING"
        if missing is not None:
            reason, command = missing
            expected[cell.name] = command
            lines.append(f"{cell.name}: MISSING: {reason} -> {command}")
            if not dry_run:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(reason + "\n")
            continue
        expected[cell.name] = rerun.format(dataset=cell.dataset)
        if marker.is_file() and not dry_run:
            marker.unlink()  # the inputs exist now
        if methods is None or cell.method in methods:
            present.append(cell)
    # Seed-major: every cell's first seed before any second seed, so a table stopped part-way already has
    # one complete row per method (and the paired test its first comparison).
    for seed in seeds:
        for cell in present:
            run_dir = cell.run_dir(root, seed)
            _check_profile(run_dir, prof)
            if is_done(run_dir):
                lines.append(f"{cell.name} seed{seed}: done, skipped")
                if not dry_run:
                    print(lines[-1], flush=True)
                continue
            twin = twin_run(cell, seed, root, prof)
            if twin is not None:
                lines.append(f"{cell.name} seed{seed}: same settings as {twin} (finished): results reused")
                if not dry_run:
                    print(lines[-1], flush=True)
                    reuse_seed(run_dir, twin)
                continue
            state = "resume" if (run_dir / "checkpoints" / "last.ckpt").is_file() else "run"
            block = [f"{cell.name} seed{seed}: {state}"]
            if cell.kind == "popular":
                block.append(
                    "    evaluate_popular on the LLM cells' test rows (data.max_eval_samples, data.seed)"
                )
            for stage, argv in stage_commands(cell, seed, root, prof):
                skip = " (finished, skipped)" if stage == "fit" and (run_dir / "FIT_DONE").is_file() else ""
                block.append(f"    {stage}{skip}: {display(argv)}")
            lines += block
            if not dry_run:
                print("\n".join(block), flush=True)
                run_seed(cell, seed, root, prof)
    plan_text = "\n".join(lines)
    if dry_run:
        return plan_text
    from iamrec.results import build_report

    root.mkdir(parents=True, exist_ok=True)
    text = build_report(root, out, expected)
    header = (
        f"# {table}: profile `{profile}` ({prof.about}), seeds {' '.join(map(str, seeds))}\n\n"
        f"Produced by `python -m iamrec.reproduce {table} --profile {profile} --datasets {','.join(datasets)} "
        f"--seeds {' '.join(map(str, seeds))}{' --methods ' + ','.join(methods) if methods else ''}` "
        f"from the runs under `{root}`.\n\n"
    )
    Path(f"{out}.md").write_text(header + text)
    return header + text


# ------------------------------------------------------------------------------- config headers


def hardware() -> str:
    """A short description of this machine for config headers: the GPU's name, else the CPU's cores."""
    import os
    import platform

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


def update_headers(
    table: str, datasets: Sequence[str], seeds: Sequence[int], profile: str, root: str | Path
) -> list[Path]:
    """Rewrite the ``# Measured:`` line of every cell config that has finished runs; returns the files."""
    from iamrec.results import aggregate, collect_runs

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
        done = [cell.run_dir(root, s) / "DONE" for s in seeds]
        seconds = [json.loads(d.read_text() or "{}").get("seconds") for d in done if d.is_file()]
        seconds = [x for x in seconds if x is not None]
        minutes = sum(seconds) / len(seconds) / 60 if seconds else None
        cell_seeds = sorted(
            runs.loc[(runs["dataset"] == cell.dataset) & (runs["method"] == cell.method), "seed"]
        )
        line = measured_line(rows.iloc[0].to_dict(), profile, cell_seeds, minutes)
        text = cell.config.read_text().splitlines()
        at = next((i for i, t in enumerate(text) if t.startswith("# Measured")), None)
        if at is None:
            raise ValueError(f"{cell.config} has no '# Measured' header line to update.")
        end = at + 1
        while end < len(text) and text[end].startswith("#   "):  # the line's continuation lines
            end += 1
        text[at:end] = [line]
        cell.config.write_text("\n".join(text) + "\n")
        changed.append(cell.config)
    return changed


def main(argv: Sequence[str] | None = None) -> None:
    """Run every cell x seed of a table (skipping finished ones) and write results/<table>.md/.csv/.png."""
    p = argparse.ArgumentParser(prog="python -m iamrec.reproduce", description=main.__doc__)
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--datasets", default="ml100k", help=f"comma-separated, from {','.join(DATASETS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default=None, help="runs root (default results/runs/<profile>/<table>)")
    p.add_argument("--out", default=None, help="report prefix (default results/<table>)")
    p.add_argument("--methods", default=None, help="comma-separated rows to run (default: every row)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument(
        "--update-headers",
        action="store_true",
        help="after the report, write each finished cell's '# Measured:' line into its config",
    )
    args = p.parse_args(argv)
    datasets = [d for d in args.datasets.replace(" ", ",").split(",") if d]
    try:
        methods = [m for m in args.methods.replace(" ", ",").split(",") if m] if args.methods else None
        print(
            reproduce(
                args.table, datasets, args.seeds, args.profile, args.root, args.out, args.dry_run, methods
            )
        )
        if args.update_headers and not args.dry_run:
            root = args.root or f"results/runs/{args.profile}/{args.table}"
            for path in update_headers(args.table, datasets, args.seeds, args.profile, root):
                print(f"updated the '# Measured' line of {path}")
    except (ValueError, FileNotFoundError) as err:
        print(f"iamrec.reproduce: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except subprocess.CalledProcessError as err:
        print(f"iamrec.reproduce: a stage failed ({display(err.cmd)}); rerun to resume.", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
