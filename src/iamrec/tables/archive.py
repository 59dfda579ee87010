"""A sitting's archive: packing its finished and unfinished cell-seeds (no checkpoints), its reports and
logs into one ``.tar.gz``, and merging several sittings' archives into the runs root with their reports.

A cell-seed found twice keeps the copy with a ``DONE``; of two finished copies with different results
(GPU runs are not bit-reproducible across sittings) the one seen first is kept (the runs root's, then the
archives in the order given) and the merge says which it kept and which it ignored; identical copies are
kept once; unfinished copies are not merged (their logs stay in the archive).

An archive is untrusted input: `iamrec.tables.unpack.scan` reads and checks a whole archive before a byte
of it is written, and each member's destination must resolve inside its table's runs folder
(`plan.default_root`: the gpu profile's runs live in the repository, under ``results/gpu/runs``).
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from iamrec import run_folder
from iamrec.errors import one_line
from iamrec.tables import unpack
from iamrec.tables.plan import DATASETS, RUNS_ROOT, default_out, default_root, plan
from iamrec.tables.report import merged_report
from iamrec.tables.unpack import MANIFEST, Copy, Scanned, SessionError

__all__ = ["MANIFEST", "SessionError", "merge", "pack", "rebuild_reports", "seed_folders"]


def seed_folders(manifest: dict[str, Any], runs_root: Path) -> Iterator[tuple[tuple, Path]]:
    """((profile, table, dataset, method, seed), folder) of every cell-seed of the manifest's tables that exists."""
    for table in manifest["tables"]:
        root = default_root(manifest["profile"], table, runs_root)
        for cell in plan(table, manifest["datasets"]):
            for seed in manifest["seeds"]:
                folder = cell.run_dir(root, seed)
                if folder.is_dir():
                    yield (manifest["profile"], table, cell.dataset, cell.method, seed), folder


def packed_files(folder: Path) -> list[Path]:
    """A cell-seed folder's files for the archive: everything but checkpoints (and the test outputs'
    copies under the logger's folders, which the seed folder holds already) and symbolic links (an
    archive holds regular files only)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if _not_regular(path) or path.suffix == ".ckpt" or rel.parts[0] == run_folder.CHECKPOINTS:
            continue
        if len(rel.parts) > 1 and rel.name in run_folder.TEST_OUTPUTS:
            continue
        files.append(path)
    return files


def _not_regular(path: Path) -> bool:
    return path.is_symlink() or not path.is_file()


def pack(archive: Path, manifest: dict[str, Any], runs_root: str | Path = RUNS_ROOT, exclude=()) -> Path:
    """Write the session archive: manifest, reports, cell-seed folders (no checkpoints; not those in
    `exclude`), the session folder. Refuses (SessionError) beyond unpack.MAX_ARCHIVE_MIB, naming the biggest files."""
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
        files += sorted(p for p in session_dir.rglob("*") if not _not_regular(p))
    manifest = {**manifest, "runs": runs, "runs_root": runs_root.as_posix()}
    for path in files:
        if path.is_absolute() or ".." in path.parts:
            raise SessionError(f"{path} is not below the current folder; run from the repository root.")
    sizes = {path: path.stat().st_size for path in files}
    biggest = ", ".join(
        f"{p} ({unpack.mib(sizes[p])})" for p in sorted(sizes, key=sizes.__getitem__, reverse=True)[:5]
    )
    if sizes and max(sizes.values()) > unpack.member_limit():  # what merge would refuse: checked here first
        raise SessionError(
            f"the archive would hold a file of {unpack.mib(max(sizes.values()))}, over the {unpack.MAX_ARCHIVE_MIB} MiB "
            f"limit; the biggest files: {biggest}."
        )
    if sum(sizes.values()) > unpack.unpack_limit():
        raise SessionError(
            f"the archive would unpack to {unpack.mib(sum(sizes.values()))}, over the {unpack.UNPACK_FACTOR * unpack.MAX_ARCHIVE_MIB:g} "
            f"MiB limit; the biggest files: {biggest}."
        )
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")  # renamed into place once whole and checked
    try:
        with tarfile.open(partial, "w:gz") as tar:
            data = (json.dumps(manifest, indent=2) + "\n").encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            for path in files:
                tar.add(path, arcname=path.as_posix(), recursive=False)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    size = partial.stat().st_size
    if size > unpack.MAX_ARCHIVE_MIB * 2**20:
        partial.unlink()
        biggest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:5]
        names = ", ".join(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in biggest)
        raise SessionError(
            f"the archive would be {size / 2**20:.1f} MiB, over the {unpack.MAX_ARCHIVE_MIB} MiB limit; the biggest files: {names}."
        )
    partial.replace(archive)
    return archive


def _results(copy: Copy):
    """(metrics, predictions) of a finished copy; SessionError naming the archive when unreadable."""
    name = run_folder.METRICS_FILE
    try:
        metrics = json.loads(copy.read(name))
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
        name = run_folder.PREDICTIONS_FILE
        predictions = copy.read(name)
        frame = None if predictions is None else pd.read_parquet(io.BytesIO(predictions))
    except SessionError:
        raise
    except Exception as err:  # anything a hostile parquet or JSON file raises
        raise unpack.refuse(copy.archive, f"{copy.path}/{name} is unreadable ({one_line(err)})") from None
    return metrics, frame


def _same(a, b) -> bool:
    """Two (metrics, predictions) results agree."""
    if a[0] != b[0]:
        return False
    if (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or a[1].reset_index(drop=True).equals(b[1].reset_index(drop=True))


def _local_results(folder: Path):
    predictions = folder / run_folder.PREDICTIONS_FILE
    try:
        return run_folder.read_metrics(folder), pd.read_parquet(
            predictions
        ) if predictions.is_file() else None
    except Exception as err:
        raise SessionError(
            f"the finished run {folder} is unreadable ({one_line(err)}); move it away."
        ) from None


def _seed_dir(key: tuple, runs_root: Path) -> tuple[Path, Path]:
    """(the cell-seed's folder, its table's runs folder) for a key (profile, table, dataset, method, seed)."""
    root = default_root(key[0], key[1], runs_root)
    return run_folder.seed_dir(root, *key[2:]), root


def _choose(
    scanned: Sequence[Scanned], runs_root: Path, said: list[str]
) -> tuple[dict[tuple, tuple[str, Any]], dict[tuple, Copy]]:
    """The finished copy kept of each cell-seed: the first seen (the runs root's, then the archives in
    order); a later one with different results is named in `said`. Returns (key -> (where the kept copy
    is, its results) for every finished key, key -> the archive copy to unpack)."""
    results: dict[tuple, tuple[str, Any]] = {}
    chosen: dict[tuple, Copy] = {}
    for one in scanned:
        for key, copy in one.copies.items():
            if not copy.finished:
                continue
            got = _results(copy)
            dest, _ = _seed_dir(key, runs_root)
            if key not in results and run_folder.is_done(dest):
                results[key] = (f"the runs root's ({dest})", _local_results(dest))
            if key in results:
                where, have = results[key]
                if not _same(have, got):
                    said.append(
                        f"[merge] {'/'.join(map(str, key[:4]))}/seed{key[4]} finished twice with different "
                        f"results (GPU runs are not bit-reproducible across sittings): kept {where}, "
                        f"ignored {one.archive}'s"
                    )
                continue  # keep the first
            results[key] = (f"{one.archive}'s", got)
            chosen[key] = copy
    return results, chosen


def _writes(
    scanned: Sequence[Scanned], chosen: dict[tuple, Copy], runs_root: Path
) -> list[tuple[tarfile.TarFile, tarfile.TarInfo, Path, Path]]:
    """(tar, member, destination, archive) of every member to unpack, each destination checked to resolve
    inside its table's runs folder (or the sessions folder), before the first is written."""
    writes = []
    for key, copy in chosen.items():
        dest, root = _seed_dir(key, runs_root)
        for rel, member in copy.members.items():
            path = unpack.target(dest, rel, root, copy.archive, member.name)
            writes.append((copy.tar, member, path, copy.archive))
    for one in scanned:  # the sittings' logs, next to the runs (what is there already is kept)
        folder = one.manifest.get("session_dir")
        if not folder:
            continue
        target = runs_root / "sessions" / PurePosixPath(folder).name
        for name, member in one.members.items():
            if name.startswith(folder + "/"):
                path = unpack.target(target, name[len(folder) + 1 :], runs_root, one.archive, name)
                if not path.exists():
                    writes.append((one.tar, member, path, one.archive))
    return sorted(writes, key=lambda w: (id(w[0]), w[1].offset))  # each archive read front to back


def merge(
    archives: Sequence[str | Path],
    runs_root: str | Path = RUNS_ROOT,
    rebuild: bool = True,
    log: Path | None = None,
) -> set[tuple]:
    """Unpack the archives' finished cell-seeds into their tables' runs folders under `runs_root`
    (`plan.default_root`) and (with `rebuild`) rewrite each table's report over every finished run; returns
    the keys (profile, table, dataset, method, seed) finished in them.

    Every check runs before anything is written (`unpack.scan`: each archive whole; where each member
    goes). A cell-seed finished twice with different results keeps the copy seen first (the runs root's,
    then the archives in order) and says which it kept and which it ignored: GPU runs are not
    bit-reproducible across sittings. Identical copies are kept once, silently."""
    runs_root = Path(runs_root)
    archives = [Path(a) for a in archives]
    said: list[str] = []
    with contextlib.ExitStack() as stack:
        scanned = [unpack.scan(archive, stack) for archive in archives]
        results, chosen = _choose(scanned, runs_root, said)
        for tar, member, path, archive in _writes(scanned, chosen, runs_root):
            unpack.write_member(tar, member, path, archive)
    written = len(chosen)
    said.insert(
        0,
        f"[merge] {len(results)} finished cell-seed(s) in {len(archives)} archive(s): {written} unpacked into "
        f"{runs_root}, {len(results) - written} there already",
    )
    manifests = [one.manifest for one in scanned]
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
            f"{a.name} ({one_line(m.get('created') or '?')}, {one_line(', '.join(m.get('gpu') or ['no GPU']))})"
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
                default_root(profile, table, runs_root),
                default_out(profile, table),
                f"{len(group)} sitting(s): {sittings}",
                session,
            )
        )
    return written
