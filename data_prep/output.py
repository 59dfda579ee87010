"""The output folder of a data prep run: its lock, the atomic swap of the whole folder, and the bytes
and sha256 of what is written (parquet files, stats.json's ``files``).

The whole output is built in memory (parquet bytes, their sha256, stats.json), then written into a
temporary sibling folder ``.<name>.tmp-<pid>``, fsynced, and swapped in with one atomic
``renameat2(RENAME_EXCHANGE)`` (elsewhere: old folder renamed aside, new one renamed in, old removed).
A reader sees the old folder or the new one, never a mix. A run holds the lock file ``.<name>.lock``
(``flock``, with its pid) next to the output from start to end: a second run into the same folder stops
at once with one sentence; a lock or temporary folder left by a killed run is taken over / removed with
a notice. An existing output folder is replaced whole, so one that holds files no data prep writes is
refused. Write failures (read-only, full disk, permission) end in one sentence and leave the folder as
it was. Parquet files are written without pandas metadata and with fixed options, so a rerun gives
byte-identical files (stats.json stores their sha256).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.parsing import DataPrepError

OUTPUT_FILES = ("items.parquet", "users.parquet", "interactions.parquet", "samples.parquet")
STATS_FILE = "stats.json"
# Test hook: seconds to sleep after each file written into the temporary folder (kill-mid-write tests).
PAUSE_ENV = "DATA_PREP_TEST_PAUSE_AFTER_FILE"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_record(path: Path, encoding: str | None = None) -> dict:
    rec = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return rec if encoding is None else rec | {"encoding": encoding}


def parquet_bytes(df: pd.DataFrame, schema: pa.Schema) -> bytes:
    """Parquet with an explicit schema, no pandas metadata and fixed options -> byte-identical reruns."""
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=True, write_statistics=True)
    return sink.getvalue().to_pybytes()


def output_hashes(files: dict[str, bytes]) -> dict:
    """stats.json's ``files.outputs`` for the given file contents (what the loader verifies)."""
    return {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()
    }


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


def resolve_output(output: str | Path) -> Path:
    """The absolute output folder; a symlink is followed (its target is what gets replaced)."""
    out = Path(output)
    if out.is_symlink():
        out = out.resolve()
    return Path(os.path.abspath(out))


def check_existing_output(out: Path) -> None:
    """An existing output must be a folder holding only data prep files (it is replaced whole)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataPrepError(
            "the output path is a file, not a folder; give --output a new folder or an earlier data prep output",
            out,
        )
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise DataPrepError(f"cannot list the output folder ({e.strerror})", out) from e
    foreign = [n for n in names if n not in (*OUTPUT_FILES, STATS_FILE)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DataPrepError(
            f"the output folder holds {foreign[0]!r}{more}, which no data prep writes; give --output a new "
            "folder or an earlier data prep output (it is replaced whole)",
            out,
        )


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created (deepest last)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


class _OutputLock:
    """``.<name>.lock`` next to the output: flock'ed while a run works, holding its pid; removed at the end.

    The kernel drops a flock when its process dies, so a lock file left by a killed run is simply taken
    over (with a notice naming the old pid); a live holder makes the second run stop at once.
    """

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, out.parent / f".{out.name}.lock", None

    @staticmethod
    def _pid(fd: int) -> int | None:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = self._pid(fd)
                os.close(fd)
                raise DataPrepError(
                    f"another data prep (pid {pid or 'unknown'}) is writing this folder (lock {self.path.name}); "
                    "wait for it to finish, then rerun",
                    self.out,
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # a finishing run unlinks the file it locked: make sure ours is the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = self._pid(fd)
        if old is not None and old != os.getpid():
            notice(
                f"{self.path} was left by pid {old}, which stopped before it finished; taking the lock over"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


_HELD: set[Path] = set()  # output folders whose lock this process holds


def held_output(out: Path) -> bool:
    """Whether this process holds the lock of the output folder ``out`` (inside ``locked_output``)."""
    return out in _HELD


def _sweep_leftovers(out: Path) -> None:
    """Temporary / set-aside folders of this output left by a killed run (we hold the lock: none is live)."""
    prefix = f".{out.name}."
    for p in sorted(out.parent.iterdir()):
        kind = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
        if not kind.startswith(("tmp-", "old-")) or p.is_symlink() or not p.is_dir():
            continue
        if kind.startswith("old-") and not out.exists():  # killed between "old aside" and "new in"
            os.rename(p, out)
            notice(f"restored {out} from {p.name}, set aside by a run that stopped before it finished")
        else:
            shutil.rmtree(p)
            notice(f"removed {p}, left by a data prep that stopped before it finished")


def _os_error(e: OSError, out: Path, tmp: Path | None = None, current: Path | None = None) -> DataPrepError:
    """One sentence for a failed write (read-only, full disk, no permission ...), naming the file."""
    name = str(e.filename or current or out)
    if tmp is not None and name.startswith(str(tmp)):
        name = name[len(str(tmp)) + 1 :] or out.name
    return DataPrepError(f"cannot write {name} ({e.strerror or e}); nothing was changed", out)


@contextlib.contextmanager
def locked_output(output: str | Path) -> Iterator[Path]:
    """Check the output path, create its parent, hold the output's lock; yields the absolute folder.

    On failure the parent folders this call created are removed again (nothing is left behind).
    """
    out = resolve_output(output)
    check_existing_output(out)
    created: list[Path] = []
    lock = _OutputLock(out)
    try:
        created = _make_parents(out.parent)
        lock.acquire()
        _sweep_leftovers(out)
    except OSError as e:
        lock.release()
        _remove_empty(created)
        raise _os_error(e, out) from e
    except BaseException:
        lock.release()
        _remove_empty(created)
        raise
    ok = False
    _HELD.add(out)
    try:
        check_existing_output(out)
        yield out
        ok = True
    finally:
        _HELD.discard(out)
        lock.release()
        if not ok:
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            d.rmdir()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, out: Path) -> Path | None:
    """Put the complete folder ``tmp`` at ``out``; returns what is left to remove (the old output)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return None
    if _exchange(tmp, out):
        return tmp
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


def write_output(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes, in order) as the folder ``out``: all of them or nothing."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    current = tmp  # the path being written, for the message (a failed write() names no file)
    try:
        tmp.mkdir()
        for name, data in files.items():
            current = tmp / name
            with open(current, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if pause:
                time.sleep(pause)
        _fsync_dir(tmp)
        current = out
        leftover = _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise _os_error(e, out, tmp, current) from e
        raise
    _fsync_dir(out.parent)
    if leftover is not None:
        shutil.rmtree(leftover, ignore_errors=True)  # if this fails, the next run sweeps it
