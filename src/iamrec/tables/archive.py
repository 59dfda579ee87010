"""A sitting's archive: packing its finished and unfinished cell-seeds (no checkpoints), its reports and
logs into one ``.tar.gz``, and merging several sittings' archives into the runs root with their reports.

A cell-seed found twice keeps the copy with a ``DONE``; of two finished copies with different results
(GPU runs are not bit-reproducible across sittings) the one seen first is kept (the runs root's, then the
archives in the order given) and the merge says which it kept and which it ignored; identical copies are
kept once; unfinished copies are not merged (their logs stay in the archive).

An archive is untrusted input (it may come from anyone): `scan` reads and checks a whole archive before a
byte of it is written — member names and every manifest field a folder is built from (a known profile and
table, datasets and methods ``[A-Za-z0-9_.-]+`` of the table, seeds >= 0, a relative session folder), only
regular files, at most `MAX_ARCHIVE_MIB` per member and ``UNPACK_FACTOR x MAX_ARCHIVE_MIB`` in all, one
copy of each cell-seed, a gzip stream that reads back whole — and each member's destination must resolve
inside the runs root. Members are then streamed into temporary files renamed into place. Anything else
refuses the whole archive with one sentence naming it (`SessionError`).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from iamrec import run_folder
from iamrec.errors import one_line
from iamrec.tables.plan import DATASETS, PROFILES, RUNS_ROOT, TABLES, default_out, plan
from iamrec.tables.report import merged_report

MAX_ARCHIVE_MIB = 16  # what a sitting may carry away (the gzip file), and what one member may unpack to
UNPACK_FACTOR = 4  # an archive unpacks to at most UNPACK_FACTOR x MAX_ARCHIVE_MIB in all (64 MiB)
MAX_MEMBERS = 20_000
CHUNK = 2**20  # members are streamed in chunks this big
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a dataset, method or folder name taken from an archive
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
        files += sorted(p for p in session_dir.rglob("*") if not _not_regular(p))
    manifest = {**manifest, "runs": runs, "runs_root": runs_root.as_posix()}
    for path in files:
        if path.is_absolute() or ".." in path.parts:
            raise SessionError(f"{path} is not below the current folder; run from the repository root.")
    sizes = {path: path.stat().st_size for path in files}
    biggest = ", ".join(
        f"{p} ({_mib(sizes[p])})" for p in sorted(sizes, key=sizes.__getitem__, reverse=True)[:5]
    )
    if sizes and max(sizes.values()) > member_limit():  # what merge would refuse: checked here first
        raise SessionError(
            f"the archive would hold a file of {_mib(max(sizes.values()))}, over the {MAX_ARCHIVE_MIB} MiB "
            f"limit; the biggest files: {biggest}."
        )
    if sum(sizes.values()) > unpack_limit():
        raise SessionError(
            f"the archive would unpack to {_mib(sum(sizes.values()))}, over the {UNPACK_FACTOR * MAX_ARCHIVE_MIB:g} "
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
    if size > MAX_ARCHIVE_MIB * 2**20:
        partial.unlink()
        biggest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:5]
        names = ", ".join(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in biggest)
        raise SessionError(
            f"the archive would be {size / 2**20:.1f} MiB, over the {MAX_ARCHIVE_MIB} MiB limit; the biggest files: {names}."
        )
    partial.replace(archive)
    return archive


# --------------------------------------------------------------------------------- reading an archive
#
# An archive is untrusted input: whatever it says is checked before a byte of it is written. Every path it
# leads to (member names, and the manifest's profile, tables, datasets, methods, seeds and session folder,
# which name the folders runs are unpacked into) must be a plain name or relative path that stays inside
# the destination; only regular files are unpacked, streamed, within `member_limit()` each and
# `unpack_limit()` in all; a malformed archive (not gzip, truncated, no or a bad manifest) is one sentence.


@dataclass
class Copy:
    """One cell-seed in one archive."""

    archive: Path
    tar: tarfile.TarFile
    path: str  # its folder inside the archive
    members: dict[str, tarfile.TarInfo]  # path inside the seed folder -> member
    finished: bool

    def read(self, name: str) -> bytes | None:
        member = self.members.get(name)
        return None if member is None else _read_member(self.tar, member)


@dataclass
class Scanned:
    """One archive, read and checked, nothing unpacked."""

    archive: Path
    tar: tarfile.TarFile
    manifest: dict[str, Any]
    members: dict[str, tarfile.TarInfo]  # every regular file, by name
    copies: dict[tuple, Copy]


def member_limit() -> int:
    """Bytes one member may unpack to (packing's limit: MAX_ARCHIVE_MIB)."""
    return int(MAX_ARCHIVE_MIB * 2**20)


def unpack_limit() -> int:
    """Bytes one archive may unpack to in all: UNPACK_FACTOR x MAX_ARCHIVE_MIB (logs compress ~5x)."""
    return int(UNPACK_FACTOR * MAX_ARCHIVE_MIB * 2**20)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _refuse(archive: Path, what: str) -> SessionError:
    return SessionError(f"{archive} is refused, nothing of it was unpacked: {what}.")


def _plain_name(value: Any) -> bool:
    """A dataset, method or folder name: ``[A-Za-z0-9_.-]+``, not ``.`` or ``..``."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None and value not in (".", "..")


def _relative(value: Any) -> PurePosixPath | None:
    """`value` as a relative path of plain names (no ``..``, not absolute, written as such), or None."""
    if not isinstance(value, str) or not value or value.startswith("/"):
        return None
    path = PurePosixPath(value)
    if path.as_posix() != value or not all(_plain_name(part) for part in path.parts):
        return None
    return path


def _member_name_problem(name: str) -> str | None:
    path = PurePosixPath(name)
    if not name or name.startswith("/") or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "an absolute path or one with control characters or backslashes"
    if path.as_posix() != name.rstrip("/") or ".." in path.parts or "." in name.split("/"):
        return "not a plain relative path (`..`, `.` or `//` in it)"
    return None


def _scan_members(tar: tarfile.TarFile, archive: Path) -> tuple[dict[str, tarfile.TarInfo], int]:
    """The archive's regular files by name, and where its data ends; reads headers only (skipping each
    member's data), and refuses before skipping past a member that breaks a limit."""
    members: dict[str, tarfile.TarInfo] = {}
    total, count = 0, 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_MEMBERS:
            raise _refuse(archive, f"it holds more than {MAX_MEMBERS} members")
        problem = _member_name_problem(member.name)
        if problem:
            raise _refuse(archive, f"member {member.name!r} is {problem}")
        if member.isdir():
            continue
        if member.name.endswith("/"):
            raise _refuse(archive, f"member {member.name!r} is a file named like a folder")
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link"}.get(
                member.type, "not a regular file (a device, fifo, sparse or other special member)"
            )
            raise _refuse(archive, f"member {member.name} is {kind}; an archive holds regular files only")
        if member.name in members:
            raise _refuse(archive, f"member {member.name} is there twice")
        if member.size > member_limit():
            raise _refuse(
                archive,
                f"member {member.name} unpacks to {_mib(member.size)}, over the {_mib(member_limit())} "
                "limit on one member",
            )
        total += member.size
        if total > unpack_limit():
            raise _refuse(
                archive,
                f"it unpacks to more than the {_mib(unpack_limit())} limit on one archive (at member "
                f"{member.name}, {_mib(member.size)})",
            )
        members[member.name] = member
    for name in members:  # a file where another member needs a folder
        parents = [p.as_posix() for p in PurePosixPath(name).parents][:-1]
        clash = next((p for p in parents if p in members), None)
        if clash is not None:
            raise _refuse(archive, f"member {clash} is a file and a folder (of {name})")
    return members, tar.offset


def _check_stream(archive: Path, data_end: int) -> None:
    """The whole gzip stream reads back (CRC, no truncation) and holds the tar's data, no more than its
    records' padding after it (decompressed in chunks, never beyond that)."""
    most = data_end + 2 * tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE
    seen = 0
    with gzip.open(archive, "rb") as stream:
        while chunk := stream.read(CHUNK):
            seen += len(chunk)
            if seen > most:
                raise _refuse(archive, f"its gzip stream expands past its tar's end ({_mib(data_end)})")
    if seen < data_end:
        raise _refuse(archive, "it is truncated (a member's data is cut short)")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A member's bytes (within the member limit, checked when scanned and counted here)."""
    with tar.extractfile(member) as src:
        data = src.read(member_limit() + 1)
    if len(data) > min(member.size, member_limit()):
        raise SessionError(f"member {member.name} holds more than its header says.")
    return data


def _manifest(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], archive: Path) -> dict[str, Any]:
    """The manifest, checked: every field a path is built from is a known or plain name."""
    if MANIFEST not in members:
        raise SessionError(
            f"{archive} has no {MANIFEST}: not an archive of `python -m iamrec.session run`; nothing of it "
            "was unpacked."
        )
    try:
        manifest = json.loads(_read_member(tar, members[MANIFEST]))
    except (ValueError, UnicodeDecodeError) as err:
        raise _refuse(archive, f"its {MANIFEST} is not JSON ({one_line(err)})") from None
    if not isinstance(manifest, dict):
        raise _refuse(archive, f"its {MANIFEST} is not a JSON object")
    missing = [k for k in ("profile", "tables", "datasets", "seeds", "runs") if k not in manifest]
    if missing:
        raise _refuse(archive, f"its {MANIFEST} lacks {', '.join(missing)}")

    def bad(field: str, value: Any, want: str) -> SessionError:
        return _refuse(archive, f"manifest field {field} is {json.dumps(value)[:120]}, not {want}")

    profile = manifest["profile"]
    if not isinstance(profile, str) or profile not in PROFILES:
        raise bad("profile", profile, f"a known profile ({', '.join(sorted(PROFILES))})")
    tables, datasets, seeds = manifest["tables"], manifest["datasets"], manifest["seeds"]
    if (
        not isinstance(tables, list)
        or not tables
        or not all(isinstance(t, str) and t in TABLES for t in tables)
    ):
        raise bad("tables", tables, f"a list of known tables ({', '.join(sorted(TABLES))})")
    if not isinstance(datasets, list) or not all(_plain_name(d) for d in datasets):
        raise bad("datasets", datasets, "a list of names ([A-Za-z0-9_.-]+)")
    if not isinstance(seeds, list) or not all(_seed(s) for s in seeds):
        raise bad("seeds", seeds, "a list of whole numbers >= 0")
    for table in tables:
        try:
            plan(table, datasets)
        except FileNotFoundError as err:
            raise _refuse(archive, f"manifest field datasets: {one_line(err).rstrip('.')}") from None
    session_dir = manifest.get("session_dir")
    if session_dir not in (None, "") and _relative(session_dir) is None:
        raise bad("session_dir", session_dir, "a relative path of plain names (no `..`)")
    for key in ("gpu",):
        value = manifest.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise bad(key, value, "a list of names")
    if manifest.get("created") is not None and not isinstance(manifest["created"], str):
        raise bad("created", manifest["created"], "a date")
    runs = manifest["runs"]
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise bad("runs", runs, "a list of runs")
    for i, run in enumerate(runs):
        for field in ("table", "dataset", "method", "seed", "path"):
            if field not in run:
                raise _refuse(archive, f"manifest field runs[{i}] lacks {field}")
        table, dataset, method, seed = run["table"], run["dataset"], run["method"], run["seed"]
        if table not in tables:
            raise bad(f"runs[{i}].table", table, f"one of the manifest's tables ({', '.join(tables)})")
        if not _plain_name(dataset) or dataset not in datasets:
            raise bad(f"runs[{i}].dataset", dataset, "one of the manifest's datasets")
        if not _plain_name(method) or method not in TABLES[table]:
            raise bad(f"runs[{i}].method", method, f"a method of {table}")
        if not _seed(seed):
            raise bad(f"runs[{i}].seed", seed, "a whole number >= 0")
        path = _relative(run["path"])
        if path is None or path.parts[-3:] != (dataset, method, f"seed{seed}"):
            raise bad(f"runs[{i}].path", run["path"], f"a relative path ending {dataset}/{method}/seed{seed}")
    return manifest


def _seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _copies(
    tar: tarfile.TarFile, archive: Path, manifest: dict[str, Any], members: dict[str, tarfile.TarInfo]
) -> dict[tuple, Copy]:
    """The archive's cell-seeds: each once (listed twice is refused like a conflict), from its folder."""
    copies: dict[tuple, Copy] = {}
    paths: dict[str, tuple] = {}
    for run in manifest["runs"]:
        key = (manifest["profile"], run["table"], run["dataset"], run["method"], run["seed"])
        name = f"{'/'.join(map(str, key[:4]))}/seed{key[4]}"
        if key in copies:
            raise _refuse(
                archive,
                f"it lists {name} twice ({copies[key].path} and {run['path']}); an archive holds each "
                "cell-seed once, so which copy counts is not clear",
            )
        for other in paths:
            if (
                run["path"] == other
                or run["path"].startswith(other + "/")
                or other.startswith(run["path"] + "/")
            ):
                raise _refuse(archive, f"runs {other} and {run['path']} share a folder")
        paths[run["path"]] = key
        prefix = run["path"] + "/"
        inside = {n[len(prefix) :]: m for n, m in members.items() if n.startswith(prefix)}
        finished = run_folder.DONE in inside and run_folder.METRICS_FILE in inside
        copies[key] = Copy(archive, tar, run["path"], inside, finished)
    return copies


def scan(archive: Path, stack: contextlib.ExitStack) -> Scanned:
    """Open and check one archive (kept open on `stack`); SessionError naming it when it is malformed,
    breaks a limit or names a path that is not plain. Nothing is written."""
    if not archive.is_file():
        raise SessionError(f"no archive {archive}.")
    try:
        tar = stack.enter_context(tarfile.open(archive, "r:gz"))  # noqa: SIM115 (closed by the stack)
        members, data_end = _scan_members(tar, archive)
        _check_stream(archive, data_end)
        manifest = _manifest(tar, members, archive)
    except SessionError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, gzip.BadGzipFile) and err.errno is not None:
            raise  # the disk's error (permission, ...): the errors policy names it
        raise SessionError(
            f"{archive} is not a readable session archive (not gzip, truncated or corrupt: {one_line(err)}); "
            "nothing of it was unpacked."
        ) from None
    return Scanned(archive, tar, manifest, members, _copies(tar, archive, manifest, members))


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
        raise _refuse(copy.archive, f"{copy.path}/{name} is unreadable ({one_line(err)})") from None
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


def _target(base: Path, rel: str, root: Path, archive: Path, name: str) -> Path:
    """Where a member goes: `base / rel`, which must resolve inside `root` and not be a folder there."""
    target = base / rel
    if not target.resolve().is_relative_to(root.resolve()) or target.is_dir():
        raise _refuse(archive, f"member {name} would be written to {target}, not a file inside {root}")
    return target


def _unpack(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    """Stream a member into a temporary sibling of `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, tar.extractfile(member) as src:
            written = 0
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > min(member.size, member_limit()):
                    raise _refuse(archive, f"member {member.name} holds more than its header says")
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def merge(
    archives: Sequence[str | Path],
    runs_root: str | Path = RUNS_ROOT,
    rebuild: bool = True,
    log: Path | None = None,
) -> set[tuple]:
    """Unpack the archives' finished cell-seeds into `runs_root` and (with `rebuild`) rewrite each table's
    report over every finished run; returns the keys (profile, table, dataset, method, seed) finished in them.

    Every check runs before anything is written (`scan`: each archive whole; where each member goes). A
    cell-seed finished twice with different results keeps the copy seen first (the runs root's, then the
    archives in order) and says which it kept and which it ignored: GPU runs are not bit-reproducible
    across sittings. Identical copies are kept once, silently."""
    runs_root = Path(runs_root)
    archives = [Path(a) for a in archives]
    scanned: list[Scanned] = []
    chosen: dict[tuple, Copy] = {}
    # key -> (where it is, (metrics, predictions)) of the finished copy kept
    results: dict[tuple, tuple[str, Any]] = {}
    said: list[str] = []
    with contextlib.ExitStack() as stack:
        for archive in archives:
            scanned.append(scan(archive, stack))
        for one in scanned:
            for key, copy in one.copies.items():
                if not copy.finished:
                    continue
                got = _results(copy)
                dest = run_folder.seed_dir(runs_root / key[0] / key[1], *key[2:])
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
        # where every member goes, checked before the first is written
        writes: list[tuple[tarfile.TarFile, tarfile.TarInfo, Path, Path]] = []
        for key, copy in chosen.items():
            dest = run_folder.seed_dir(runs_root / key[0] / key[1], *key[2:])
            for rel, member in copy.members.items():
                writes.append(
                    (copy.tar, member, _target(dest, rel, runs_root, copy.archive, member.name), copy.archive)
                )
        for one in scanned:  # the sittings' logs, next to the runs (what is there already is kept)
            folder = one.manifest.get("session_dir")
            if not folder:
                continue
            target = runs_root / "sessions" / PurePosixPath(folder).name
            for name, member in one.members.items():
                if name.startswith(folder + "/"):
                    path = _target(target, name[len(folder) + 1 :], runs_root, one.archive, name)
                    if not path.exists():
                        writes.append((one.tar, member, path, one.archive))
        for tar, member, path, archive in sorted(writes, key=lambda w: (id(w[0]), w[1].offset)):
            _unpack(tar, member, path, archive)
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
                runs_root / profile / table,
                default_out(profile, table),
                f"{len(group)} sitting(s): {sittings}",
                session,
            )
        )
    return written
