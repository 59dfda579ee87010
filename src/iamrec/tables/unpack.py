"""Reading a sitting's archive as untrusted input (it may come from anyone): whatever it says is checked
before a byte of it is written.

Every path it leads to (member names, and the manifest's profile, tables, datasets, methods, seeds and
session folder, which name the folders runs are unpacked into) must be a plain name or relative path that
stays inside the destination; only regular files are unpacked, streamed into temporary files renamed into
place, within `member_limit()` each and `unpack_limit()` in all; one copy of each cell-seed; a malformed
archive (not gzip, truncated, no or a bad manifest) is one sentence naming it (`SessionError`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from iamrec import run_folder
from iamrec.errors import one_line
from iamrec.tables.plan import PROFILES, TABLES, plain_name, plan

MAX_ARCHIVE_MIB = 16  # what a sitting may carry away (the gzip file), and what one member may unpack to
UNPACK_FACTOR = 4  # an archive unpacks to at most UNPACK_FACTOR x MAX_ARCHIVE_MIB in all (64 MiB)
MAX_MEMBERS = 20_000
CHUNK = 2**20  # members are streamed in chunks this big
MANIFEST = "iamrec-session.json"


class SessionError(RuntimeError):
    """A session cannot do what was asked (archive too big, conflicting runs, not an archive)."""


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
        return None if member is None else read_member(self.tar, member)


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


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def refuse(archive: Path, what: str) -> SessionError:
    return SessionError(f"{archive} is refused, nothing of it was unpacked: {what}.")


def _relative(value: Any) -> PurePosixPath | None:
    """`value` as a relative path of plain names (no ``..``, not absolute, written as such), or None."""
    if not isinstance(value, str) or not value or value.startswith("/"):
        return None
    path = PurePosixPath(value)
    if path.as_posix() != value or not all(plain_name(part) for part in path.parts):
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
            raise refuse(archive, f"it holds more than {MAX_MEMBERS} members")
        problem = _member_name_problem(member.name)
        if problem:
            raise refuse(archive, f"member {member.name!r} is {problem}")
        if member.isdir():
            continue
        if member.name.endswith("/"):
            raise refuse(archive, f"member {member.name!r} is a file named like a folder")
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link"}.get(
                member.type, "not a regular file (a device, fifo, sparse or other special member)"
            )
            raise refuse(archive, f"member {member.name} is {kind}; an archive holds regular files only")
        if member.name in members:
            raise refuse(archive, f"member {member.name} is there twice")
        if member.size > member_limit():
            raise refuse(
                archive,
                f"member {member.name} unpacks to {mib(member.size)}, over the {mib(member_limit())} "
                "limit on one member",
            )
        total += member.size
        if total > unpack_limit():
            raise refuse(
                archive,
                f"it unpacks to more than the {mib(unpack_limit())} limit on one archive (at member "
                f"{member.name}, {mib(member.size)})",
            )
        members[member.name] = member
    for name in members:  # a file where another member needs a folder
        parents = [p.as_posix() for p in PurePosixPath(name).parents][:-1]
        clash = next((p for p in parents if p in members), None)
        if clash is not None:
            raise refuse(archive, f"member {clash} is a file and a folder (of {name})")
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
                raise refuse(archive, f"its gzip stream expands past its tar's end ({mib(data_end)})")
    if seen < data_end:
        raise refuse(archive, "it is truncated (a member's data is cut short)")


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
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
        manifest = json.loads(read_member(tar, members[MANIFEST]))
    except (ValueError, UnicodeDecodeError) as err:
        raise refuse(archive, f"its {MANIFEST} is not JSON ({one_line(err)})") from None
    if not isinstance(manifest, dict):
        raise refuse(archive, f"its {MANIFEST} is not a JSON object")
    missing = [k for k in ("profile", "tables", "datasets", "seeds", "runs") if k not in manifest]
    if missing:
        raise refuse(archive, f"its {MANIFEST} lacks {', '.join(missing)}")

    def bad(field: str, value: Any, want: str) -> SessionError:
        return refuse(archive, f"manifest field {field} is {json.dumps(value)[:120]}, not {want}")

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
    if not isinstance(datasets, list) or not all(plain_name(d) for d in datasets):
        raise bad("datasets", datasets, "a list of names ([A-Za-z0-9_.-]+)")
    if not isinstance(seeds, list) or not all(_seed(s) for s in seeds):
        raise bad("seeds", seeds, "a list of whole numbers >= 0")
    for table in tables:
        try:
            plan(table, datasets)
        except FileNotFoundError as err:
            raise refuse(archive, f"manifest field datasets: {one_line(err).rstrip('.')}") from None
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
                raise refuse(archive, f"manifest field runs[{i}] lacks {field}")
        table, dataset, method, seed = run["table"], run["dataset"], run["method"], run["seed"]
        if table not in tables:
            raise bad(f"runs[{i}].table", table, f"one of the manifest's tables ({', '.join(tables)})")
        if not plain_name(dataset) or dataset not in datasets:
            raise bad(f"runs[{i}].dataset", dataset, "one of the manifest's datasets")
        if not plain_name(method) or method not in TABLES[table]:
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
            raise refuse(
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
                raise refuse(archive, f"runs {other} and {run['path']} share a folder")
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


def target(base: Path, rel: str, root: Path, archive: Path, name: str) -> Path:
    """Where a member goes: `base / rel`, which must resolve inside `root` and not be a folder there."""
    target = base / rel
    if not target.resolve().is_relative_to(root.resolve()) or target.is_dir():
        raise refuse(archive, f"member {name} would be written to {target}, not a file inside {root}")
    return target


def write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    """Stream a member into a temporary sibling of `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, tar.extractfile(member) as src:
            written = 0
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > min(member.size, member_limit()):
                    raise refuse(archive, f"member {member.name} holds more than its header says")
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
