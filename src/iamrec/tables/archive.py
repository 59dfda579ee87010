"""A sitting's archive: packing its finished and unfinished cell-seeds (no checkpoints), its reports and
logs into one ``.tar.gz``, and merging several sittings' archives into the runs root with their reports.

A cell-seed found twice keeps the copy with a ``DONE``; two finished copies must agree (same test metrics
and predictions), else it is an error naming both; unfinished copies are not merged (their logs stay in
the archive).
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from iamrec import run_folder
from iamrec.tables.plan import DATASETS, RUNS_ROOT, default_out, plan
from iamrec.tables.report import merged_report

MAX_ARCHIVE_MIB = 16
MANIFEST = "iamrec-session.json"


class SessionError(RuntimeError):
    """A session cannot do what was asked (archive too big, conflicting runs, not an archive)."""


def seed_folders(manifest: dict[str, Any], runs_root: Path) -> Iterator[tuple[tuple, Path]]:
    """((profile, table, dataset, method, seed), folder) of every cell-seed of the manifest's tables that exists."""
    for table in manifest["tables"]:
        root = runs_root / manifest["profile"] / table
        for cell in plan(table, manifest["datasets"]):
            for seed in manifest["seeds"]:
                folder = cell.run_dir(root, seed)
                if folder.is_dir():
                    yield (manifest["profile"], table, cell.dataset, cell.method, seed), folder


def packed_files(folder: Path) -> list[Path]:
    """A cell-seed folder's files for the archive: everything but checkpoints (and the test outputs'
    copies under the logger's folders, which the seed folder holds already)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.suffix == ".ckpt" or rel.parts[0] == run_folder.CHECKPOINTS:
            continue
        if len(rel.parts) > 1 and rel.name in run_folder.TEST_OUTPUTS:
            continue
        files.append(path)
    return files


def pack(archive: Path, manifest: dict[str, Any], runs_root: str | Path = RUNS_ROOT, exclude=()) -> Path:
    """Write the session archive: manifest, reports, cell-seed folders (no checkpoints; not those in
    `exclude`), the session folder. Refuses (SessionError) beyond MAX_ARCHIVE_MIB, naming the biggest files."""
    runs_root = Path(runs_root)
    files: list[Path] = []
    runs = []
    for key, folder in seed_folders(manifest, runs_root):
        if key in exclude:
            continue
        files += packed_files(folder)
        runs.append(
            {
                "table": key[1],
                "dataset": key[2],
                "method": key[3],
                "seed": key[4],
                "path": folder.as_posix(),
                "finished": run_folder.is_done(folder),
            }
        )
    for table in manifest["tables"]:
        out = default_out(manifest["profile"], table)
        files += [p for p in (Path(f"{out}{ext}") for ext in (".md", ".csv", ".png")) if p.is_file()]
    session_dir = Path(manifest.get("session_dir") or "")
    if manifest.get("session_dir") and session_dir.is_dir():
        files += sorted(p for p in session_dir.rglob("*") if p.is_file())
    manifest = {**manifest, "runs": runs, "runs_root": runs_root.as_posix()}
    for path in files:
        if path.is_absolute() or ".." in path.parts:
            raise SessionError(f"{path} is not below the current folder; run from the repository root.")
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
        for path in files:
            tar.add(path, arcname=path.as_posix(), recursive=False)
    size = partial.stat().st_size
    if size > MAX_ARCHIVE_MIB * 2**20:
        partial.unlink()
        biggest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:5]
        names = ", ".join(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in biggest)
        raise SessionError(
            f"the archive would be {size / 2**20:.1f} MiB, over the {MAX_ARCHIVE_MIB} MiB limit; the biggest files: {names}."
        )
    partial.replace(archive)
    return archive


# -------------------------------------------------------------------------------------------- merge


@dataclass
class Copy:
    """One cell-seed in one archive."""

    archive: Path
    members: dict[str, tarfile.TarInfo]  # path inside the seed folder -> member
    finished: bool

    def read(self, tar: tarfile.TarFile, name: str) -> bytes | None:
        member = self.members.get(name)
        return None if member is None else tar.extractfile(member).read()


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    try:
        return json.loads(tar.extractfile(MANIFEST).read())
    except KeyError:
        raise SessionError(
            f"{archive} has no {MANIFEST}: not an archive of `python -m iamrec.session run`."
        ) from None


def _copies(tar: tarfile.TarFile, archive: Path) -> tuple[dict[str, Any], dict[tuple, Copy]]:
    manifest = _read_manifest(tar, archive)
    members = {m.name: m for m in tar.getmembers() if m.isfile()}
    copies = {}
    for run in manifest.get("runs", []):
        prefix = run["path"].rstrip("/") + "/"
        inside = {}
        for name, member in members.items():
            if name.startswith(prefix):
                rel = PurePosixPath(name[len(prefix) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise SessionError(f"{archive}: unsafe member {name}.")
                inside[rel.as_posix()] = member
        key = (manifest["profile"], run["table"], run["dataset"], run["method"], int(run["seed"]))
        finished = run_folder.DONE in inside and run_folder.METRICS_FILE in inside
        copies[key] = Copy(archive, inside, finished)
    return manifest, copies


def _results(metrics: bytes | None, predictions: bytes | None):
    frame = None if predictions is None else pd.read_parquet(io.BytesIO(predictions))
    return (json.loads(metrics) if metrics is not None else None), frame


def _same(a, b) -> bool:
    """Two (metrics, predictions) results agree."""
    if a[0] != b[0]:
        return False
    if (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or a[1].reset_index(drop=True).equals(b[1].reset_index(drop=True))


def _local_results(folder: Path):
    predictions = folder / run_folder.PREDICTIONS_FILE
    return run_folder.read_metrics(folder), pd.read_parquet(predictions) if predictions.is_file() else None


def merge(
    archives: Sequence[str | Path],
    runs_root: str | Path = RUNS_ROOT,
    rebuild: bool = True,
    log: Path | None = None,
) -> set[tuple]:
    """Unpack the archives' finished cell-seeds into `runs_root` and (with `rebuild`) rewrite each table's
    report over every finished run; returns the keys (profile, table, dataset, method, seed) finished in them.

    Every check runs before anything is written: conflicting finished copies are an error naming both."""
    runs_root = Path(runs_root)
    archives = [Path(a) for a in archives]
    manifests: list[dict[str, Any]] = []
    chosen: dict[tuple, Copy] = {}
    # key -> (where it is, (metrics, predictions)) of the finished copy kept
    results: dict[tuple, tuple[str, Any]] = {}
    tars: dict[Path, tarfile.TarFile] = {}
    with contextlib.ExitStack() as stack:
        for archive in archives:
            if not archive.is_file():
                raise SessionError(f"no archive {archive}.")
            tar = tars[archive] = stack.enter_context(tarfile.open(archive, "r:gz"))
            manifest, copies = _copies(tar, archive)
            manifests.append(manifest)
            for key, copy in copies.items():
                if not copy.finished:
                    continue
                got = _results(
                    copy.read(tar, run_folder.METRICS_FILE), copy.read(tar, run_folder.PREDICTIONS_FILE)
                )
                dest = run_folder.seed_dir(runs_root / key[0] / key[1], *key[2:])
                if key not in results and run_folder.is_done(dest):
                    results[key] = (f"the runs root ({dest})", _local_results(dest))
                if key in results:
                    where, have = results[key]
                    if not _same(have, got):
                        raise SessionError(
                            f"conflicting finished results for {'/'.join(map(str, key[:4]))}/seed{key[4]}: "
                            f"{where} and {archive} differ; move one away and merge again."
                        )
                    continue  # an identical duplicate: keep the first
                results[key] = (str(archive), got)
                chosen[key] = copy
        written = 0
        for key, copy in chosen.items():
            dest = run_folder.seed_dir(runs_root / key[0] / key[1], *key[2:])
            for rel, member in copy.members.items():
                path = dest / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tars[copy.archive].extractfile(member).read())
            written += 1
        for archive, manifest in zip(archives, manifests):  # the sittings' logs, next to the runs
            folder = manifest.get("session_dir")
            if not folder:
                continue
            target = runs_root / "sessions" / Path(folder).name
            for member in tars[archive].getmembers():
                rel = (
                    PurePosixPath(member.name).relative_to(folder)
                    if member.name.startswith(folder + "/")
                    else None
                )
                if (
                    member.isfile()
                    and rel is not None
                    and ".." not in rel.parts
                    and not (target / rel).exists()
                ):
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    (target / rel).write_bytes(tars[archive].extractfile(member).read())
    said = [
        f"[merge] {len(results)} finished cell-seed(s) in {len(archives)} archive(s): {written} unpacked into "
        f"{runs_root}, {len(results) - written} there already"
    ]
    if rebuild:
        said += [f"[merge] wrote {path}" for path in rebuild_reports(manifests, archives, runs_root)]
    print("\n".join(said), flush=True)
    if log is not None:
        log.write_text("\n".join(said) + "\n")
    return set(results)


def rebuild_reports(
    manifests: Sequence[dict[str, Any]], archives: Sequence[Path], runs_root: Path
) -> list[Path]:
    """One report per (profile, table) of the manifests, over every finished run under the runs root."""
    written = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for manifest in manifests:
        for table in manifest["tables"]:
            groups.setdefault((manifest["profile"], table), []).append(manifest)
    for (profile, table), group in groups.items():
        datasets = [d for d in DATASETS if any(d in m["datasets"] for m in group)]
        datasets += sorted({d for m in group for d in m["datasets"]} - set(datasets))
        seeds = sorted({int(s) for m in group for s in m["seeds"]})
        sittings = "; ".join(
            f"{a.name} ({m.get('created', '?')}, {', '.join(m.get('gpu') or ['no GPU'])})"
            for a, m in zip(archives, manifests)
            if m in group
        )
        session = (
            f"python -m iamrec.session run --profile {profile} --tables {table} --datasets {','.join(datasets)} "
            f"--seeds {' '.join(map(str, seeds))} --minutes M --resume {' '.join(str(a) for a in archives)}"
        )
        written.append(
            merged_report(
                profile,
                table,
                datasets,
                seeds,
                runs_root / profile / table,
                default_out(profile, table),
                f"{len(group)} sitting(s): {sittings}",
                session,
            )
        )
    return written
