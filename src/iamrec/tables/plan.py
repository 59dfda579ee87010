"""The plan of a table: its cells, the profiles layered over them, their resolved configs and commands.

A **cell** is one (dataset, method) of a table; its config is `configs/<table>/<dataset>/<method>.yaml`, a
small file layered over the dataset's base config `configs/<dataset>.yaml` (LLM cells; LightningCLI merges
later `--config` files over earlier ones). A **profile** is a set of YAML overlays under `configs/profiles/`
layered last over every cell, one per runner (`<profile>.yaml` over the LLM cells, `<profile>-sasrec.yaml`
over SASRec's). A cell's settings are resolved by the same jsonargparse parser its CLI uses
(`resolved_config`), so no default is restated here.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import shlex
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iamrec import run_folder
from iamrec.attention.schedule import PRESETS

TABLES: dict[str, tuple[str, ...]] = {
    "table2": ("popular", "sasrec", "causal", "hatllm", "iam", "added_iam"),
    "ablation": PRESETS,  # every layer schedule preset
}
DATASETS: tuple[str, ...] = ("ml100k", "toys", "sports", "beauty")
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a dataset or method name: one plain folder name


def plain_name(value: Any) -> bool:
    """A dataset, method or folder name: ``[A-Za-z0-9_.-]+``, not ``.`` or ``..``."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None and value not in (".", "..")


CONFIG_ROOT = Path("configs")
PROFILE_ROOT = CONFIG_ROOT / "profiles"
RUNS_ROOT = Path("results/runs")
IAMREC = (sys.executable, "-m", "iamrec.cli")
SASREC = (sys.executable, "-m", "iamrec.baselines.sasrec")


@dataclass(frozen=True)
class Profile:
    """YAML overlays layered last (`--config`) over every cell of a run: `llm` over the LLM cells (it
    also sets the test subset most-popular scores), `sasrec` over the SASRec cells."""

    name: str
    llm: tuple[Path, ...]
    sasrec: tuple[Path, ...]
    about: str


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        "cpu",
        llm=(PROFILE_ROOT / "cpu.yaml",),
        sasrec=(PROFILE_ROOT / "cpu-sasrec.yaml",),
        about="2-core CPU: 64 steps x batch 8 (512 train samples), 80 test samples, SmolLM2-135M",
    ),
    "gpu": Profile(
        "gpu",
        llm=(PROFILE_ROOT / "gpu.yaml",),
        sasrec=(PROFILE_ROOT / "gpu-sasrec.yaml",),
        about="one GPU: full fine-tuning, 1 epoch, whole test split, SmolLM2-135M",
    ),
    "tiny": Profile(
        "tiny",
        llm=(PROFILE_ROOT / "tiny.yaml",),
        sasrec=(PROFILE_ROOT / "tiny-sasrec.yaml",),
        about="any CPU in a minute: random tiny Llama, 4 steps, 6 test samples; the plumbing, not a result",
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
        """The cell's own `--config` files in order: the dataset base then the cell (SASRec's stands alone)."""
        if self.kind == "sasrec":
            return (self.config,)
        return (CONFIG_ROOT / f"{self.dataset}.yaml", self.config)

    def overlays(self, profile: Profile) -> tuple[Path, ...]:
        """The profile's overlays for this cell's runner."""
        return profile.sasrec if self.kind == "sasrec" else profile.llm

    def layers(self, profile: Profile) -> tuple[Path, ...]:
        """Every `--config` file of the cell under `profile`, in order: its configs, then the overlays."""
        return self.configs + self.overlays(profile)

    def run_dir(self, root: Path, seed: int) -> Path:
        return run_folder.seed_dir(root, self.dataset, self.method, seed)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.method}"


def plan(table: str, datasets: Sequence[str]) -> list[Cell]:
    """Every cell of `table` for `datasets`, in table order; an error naming a missing config file."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of {sorted(TABLES)}.")
    for d in datasets:
        if not plain_name(d):
            raise ValueError(
                f"{d!r} is not a dataset name (letters, digits, _ . -); known: {', '.join(DATASETS)}."
            )
    cells = [Cell(table, d, m) for d in datasets for m in TABLES[table]]
    absent = [str(c.config) for c in cells if not c.config.is_file()]
    if absent:
        raise FileNotFoundError(f"no config for {absent[0]} (known datasets: {', '.join(DATASETS)}).")
    return cells


# Profiles whose runs are committed (small files only: checkpoints are ignored by git), so their tables
# build up in the repository sitting after sitting: results/<profile>/runs/<table>.
COMMITTED_RUNS = ("gpu",)


def default_root(profile: str, table: str, runs_root: str | Path = RUNS_ROOT) -> Path:
    """Where a table's run folders live: ``<runs_root>/<profile>/<table>``, except for the default runs
    root and a profile of `COMMITTED_RUNS`: ``results/<profile>/runs/<table>`` (tracked by git)."""
    if Path(runs_root) == RUNS_ROOT and profile in COMMITTED_RUNS:
        return Path("results") / profile / "runs" / table
    return Path(runs_root) / profile / table


def default_out(profile: str, table: str) -> Path:
    """The report prefix (``.md``, ``.csv``, ``.png``): ``results/<profile>/<table>``; the committed `cpu`
    reports stay at ``results/<table>``."""
    return Path("results") / table if profile == "cpu" else Path("results") / profile / table


# ------------------------------------------------------------------------------------ resolve configs


class _Parsed(Exception):
    """Carries a parsed config out of the CLI before it builds anything."""


def _parse(kind: str, files: tuple[str, ...]) -> dict[str, Any]:
    """The config the cell's own CLI parses from `files` (defaults included), as `--print_config` shows it."""
    if kind == "sasrec":
        from iamrec.baselines.sasrec import SASRec, SASRecCLI, SASRecDataModule

        cli_class, model_class, data_class = SASRecCLI, SASRec, SASRecDataModule
    else:
        from iamrec.cli import IAMRecCLI
        from iamrec.data import IAMDataModule
        from iamrec.lit_module import IAMRecModule

        cli_class, model_class, data_class = IAMRecCLI, IAMRecModule, IAMDataModule

    class Resolver(cli_class):
        def parse_arguments(self, parser, args) -> None:  # the public hook right after parsing
            super().parse_arguments(parser, args)
            raise _Parsed(yaml.safe_load(parser.dump(self.config, skip_none=False)))

    args = [f"--config={f}" for f in files]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "args given beside sys.argv": intended here
            Resolver(model_class, data_class, run=False, args=args, parser_kwargs={"exit_on_error": False})
    except _Parsed as parsed:
        config = parsed.args[0]
        config.pop("config", None)
        return config
    raise AssertionError("the CLI returned without parsing")  # pragma: no cover


@functools.lru_cache(maxsize=256)
def _parse_cached(kind: str, files: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    return yaml.safe_dump(_parse(kind, files))


def resolved_config(cell: Cell, profile: Profile) -> dict[str, Any]:
    """The cell's settings under `profile`: its config files and the profile's overlays parsed in order by
    the cell's own CLI (its jsonargparse parser: every default included, exactly what `--print_config`
    shows). Parsed once per set of file contents."""
    files = tuple(str(p) for p in cell.layers(profile))
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in map(Path, files))
    return yaml.safe_load(_parse_cached(cell.kind, files, stamps))


def data_settings(cell: Cell, profile: Profile) -> dict[str, Any]:
    """The resolved ``data`` section of the cell (data_dir, seed, max_eval_samples ...)."""
    return resolved_config(cell, profile)["data"]


def missing_inputs(cell: Cell, profile: Profile) -> tuple[str, str] | None:
    """(reason, command that provides it) when the cell's data or backbone is absent, else None."""
    config = resolved_config(cell, profile)
    data_dir = config["data"]["data_dir"]
    reasons, commands = [], []
    if not (Path(data_dir) / "samples.parquet").is_file():
        reasons.append(f"no processed data ({data_dir}/samples.parquet)")
        commands.append(DATA_COMMANDS.get(cell.dataset, AMAZON_COMMAND.format(data_dir=data_dir)))
    if cell.kind == "llm":
        backbone = str(config["model"]["backbone"])
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
    from huggingface_hub import try_to_load_from_cache

    from iamrec.model.loading import hub_reachable, looks_like_hub_id

    if spec == "tiny" or Path(spec).is_dir():
        return True
    if not looks_like_hub_id(spec):
        return False
    return isinstance(try_to_load_from_cache(spec, "config.json"), str) or hub_reachable()


# ------------------------------------------------------------------------------------------ commands


def stage_commands(cell: Cell, seed: int, root: Path, profile: Profile) -> list[tuple[str, list[str]]]:
    """[(stage, argv)] for one cell x seed (empty for `popular`, which runs in-process)."""
    if cell.kind == "popular":
        return []
    run_dir = cell.run_dir(root, seed)
    entry = SASREC if cell.kind == "sasrec" else IAMREC
    common = [f"--config={c}" for c in cell.layers(profile)]
    common += [f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}"]
    fit = [*entry, "fit", *common]
    if run_folder.last_checkpoint(run_dir).is_file():
        fit.append("--ckpt_path=last")  # resume an interrupted fit
    best = run_folder.best_checkpoints(run_dir) if cell.kind == "sasrec" else []
    test = [*entry, "test", *common, f"--ckpt_path={best[-1] if best else 'last'}"]
    return [("fit", fit), ("test", test)]  # the order run_seed relies on


def popular_rows(cell: Cell, profile: Profile) -> tuple[str, Any]:
    """(data_dir, test rows of samples.parquet): the LLM cells' test subset (`eval_subset_rows`)."""
    from iamrec.data.dataset import eval_subset_rows

    data = data_settings(cell, profile)
    rows = eval_subset_rows(data["data_dir"], "test", data["max_eval_samples"], data["seed"])
    return data["data_dir"], rows


def display(argv: Sequence[str]) -> str:
    """The command as a person would type it (`iamrec ...` instead of `python -m iamrec.cli`)."""
    text = shlex.join(argv)
    return text.replace(shlex.join(IAMREC), "iamrec").replace(
        shlex.join(SASREC), "python -m iamrec.baselines.sasrec"
    )


def command(
    table: str,
    profile: str,
    datasets: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[str] | None = None,
    root: str | Path | None = None,
    out: str | Path | None = None,
    minutes: float | None = None,
) -> str:
    """The `python -m iamrec.reproduce` line for these settings (`--root`/`--out` only when not the default)."""
    parts = [f"python -m iamrec.reproduce {table} --profile {profile} --datasets {','.join(datasets)}"]
    parts.append(f"--seeds {' '.join(map(str, seeds))}")
    if methods:
        parts.append(f"--methods {','.join(methods)}")
    if root is not None and Path(root) != default_root(profile, table):
        parts.append(f"--root {root}")
    if out is not None and Path(out) != default_out(profile, table):
        parts.append(f"--out {out}")
    if minutes is not None:
        parts.append(f"--minutes {minutes:g}")
    return " ".join(parts)


def check_numbers(minutes: float | None, jobs: int | None, seeds: Sequence[int]) -> None:
    """`--minutes` finite and >= 0, `--jobs` >= 1, `--seeds` whole numbers >= 0 (`reproduce` and `session
    run` alike); else a ValueError naming the flag."""
    if minutes is not None:
        try:
            finite = math.isfinite(float(minutes)) and not isinstance(minutes, bool)
        except (TypeError, ValueError):
            finite = False
        if not finite or float(minutes) < 0:
            raise ValueError(f"--minutes must be a finite number of minutes >= 0, got {minutes!r}.")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, numbers.Integral) or jobs < 1):
        raise ValueError(f"--jobs must be at least 1, got {jobs!r}.")
    if not seeds:
        raise ValueError("--seeds needs at least one seed.")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"--seeds must be whole numbers >= 0, got {seed!r}.")


@dataclass(frozen=True)
class TableRun:
    """The settings of one `reproduce` run of a table (what `python -m iamrec.reproduce` takes).

    `methods` restricts what is *run* to those rows (default: all); the report covers every finished run
    under `root`. `minutes`: a time budget (`iamrec.tables.budget`). `jobs`: at most this many
    cell-seeds at once (sharing the machine's GPU); None: one without a budget, chosen from the measured
    rates within one."""

    table: str
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    profile: str = "cpu"
    root: Path | None = None
    out: Path | None = None
    methods: tuple[str, ...] | None = None
    minutes: float | None = None
    jobs: int | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("datasets", tuple(self.datasets))
        set_("seeds", tuple(self.seeds))
        set_("methods", tuple(self.methods) if self.methods else None)
        set_("root", Path(self.root or default_root(self.profile, self.table)))
        set_("out", Path(self.out or default_out(self.profile, self.table)))
        check_numbers(self.minutes, self.jobs, self.seeds)
        unknown = sorted(set(self.methods or ()) - set(TABLES[self.table])) if self.table in TABLES else []
        if unknown:
            raise ValueError(
                f"unknown method(s) {unknown} for {self.table}; choose from {', '.join(TABLES[self.table])}."
            )

    @property
    def prof(self) -> Profile:
        return PROFILES[self.profile]

    def command(self, minutes: float | None = None) -> str:
        """The command line of this run (with `minutes` as its budget, if given)."""
        return command(
            self.table, self.profile, self.datasets, self.seeds, self.methods, self.root, self.out, minutes
        )
