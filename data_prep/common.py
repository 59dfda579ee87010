"""Shared pieces of every `data_prep.<source>` module: strict parsing, filtering, dense ids, protocols and
the atomic writing of the output folder.

Every source module parses its raw files into two frames and hands them to :func:`build_dataset`:

- raw items: ``raw_item_id`` (str), ``title`` (str or None: None means "no usable title"), optional
  text columns, plus ``drop_reason`` (str or None) when the source already decided to drop an item
  (missing / HTML / long title ...).
- raw interactions: ``raw_user_id`` (str), ``raw_item_id`` (str), ``timestamp`` (int64 seconds),
  optional ``rating``; row order = file order (``order`` is added here, 0..N-1).

Strict inputs (the helpers below, used by every source): each value is parsed in its own type and never
passes through float. Integers (times, ratings) are parsed exactly (``parse_int`` / ``json_int``: "3",
"3.0" and "3e0" are 3; "3.5", "NaN", "Infinity", "1e400" and "three" stop the run), times must lie in
[1970-01-01T00:00:01, 2100-01-01) in seconds (``check_time``; a time in milliseconds is named as such).
A blank or null id ("", "null", "NaN", JSON null ...) never becomes an id: its line is dropped and counted
(``missing_user_id:<file>`` ...) — when no usable line is left the run stops naming the first bad line.
Text files are read as bytes and decoded line by line, so a decoding error names its line; a UTF-8
byte-order mark is removed, never glued to the first id; ``detect_encoding`` picks UTF-8 when the whole
file is valid UTF-8, else the source's fallback (latin-1 for the GroupLens files), and a source may take
an ``--encoding``. A bad value stops the run with one sentence naming the file and line
(``DataPrepError``; exit code 2 from ``python -m data_prep.<source>``); nothing is written.

:func:`build_dataset` then applies, in this order, counting every dropped row by reason:
rating threshold -> time window -> dropped items (their interactions too) -> duplicate (user, item) pairs
(the earliest one is kept) -> iterative k-core -> protocol minimum (loo needs 3 interactions per user) ->
items left without interactions. Dense ids follow the natural order of the raw ids (numeric when all
raw ids are digits, else lexicographic), so ML raw id 1 becomes item 0.

Time order and ties: each user's interactions are ordered by (timestamp, file order). ML-100K has many
interactions of one user in the same second; file order is the only information left, and using it
makes the result deterministic and independent of sort algorithms.

Protocols (one sample = user, history of earlier item ids oldest first, target item):

- ``loo``: per user the last interaction is the test target, the second-last the valid target, and every
  earlier interaction with at least one item before it is a train target. History = the last
  ``max_history`` items before the target (default 50).
- ``d3`` (D3 / BIGRec / MiniOneRec): every interaction with at least one earlier interaction of its user
  is a target, history = up to ``max_history`` (default 10) earlier items. All samples are sorted by
  (target timestamp, file order of the target interaction) and cut by position: the first
  ``floor(0.8 N)`` are train, the next ``floor(0.9 N) - floor(0.8 N)`` valid, the rest test — D3's own
  cut. Ties at a boundary: samples sharing the boundary second are split by file order, so a valid
  (test) target is never earlier than any train (valid) target, but may share its second; stats.json
  counts such boundary ties. A protocol that would leave a split empty stops the run (nothing written).

The processed contract, written to the output folder (read only through ``iamrec.data``)::

    items.parquet         item_id (dense 0..I-1), title (non-empty), raw_item_id[, text columns]
    users.parquet         user_id (dense 0..U-1), raw_user_id
    interactions.parquet  user_id, item_id, timestamp; per user in time order
    samples.parquet       user_id, history (list of item_id, oldest first), target, target_timestamp,
                          split (train / valid / test); a sample's row number is its ``sample_index``
    stats.json            protocol, raw / kept counts, every dropped row by reason, samples per split,
                          sha256 (and size) of every input and output file: the loader checks them

Writing: the whole output is built in memory (parquet bytes, their sha256, stats.json), then written
into a temporary sibling folder ``.<name>.tmp-<pid>``, fsynced, and swapped in with one atomic
``renameat2(RENAME_EXCHANGE)`` (elsewhere: old folder renamed aside, new one renamed in, old removed).
A reader sees the old folder or the new one, never a mix. A run holds the lock file ``.<name>.lock``
(``flock``, with its pid) next to the output from start to end: a second run into the same folder stops
at once with one sentence; a lock or temporary folder left by a killed run is taken over / removed with
a notice. An existing output folder is replaced whole, so one that holds files no data prep writes is
refused. Write failures (read-only, full disk, permission) end in one sentence and leave the folder as
it was.

Nothing here is random; ``seed`` is recorded in stats.json only so that a future random protocol has a
place for it. Parquet files are written without pandas metadata and with fixed options, so a rerun gives
byte-identical files (stats.json stores their sha256).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

Protocol = Literal["d3", "loo"]
SPLITS = ("train", "valid", "test")
DEFAULT_MAX_HISTORY = {"d3": 10, "loo": 50}
D3_FRACTIONS = (0.8, 0.1, 0.1)
OUTPUT_FILES = ("items.parquet", "users.parquet", "interactions.parquet", "samples.parquet")
STATS_FILE = "stats.json"
MIN_TIME, MAX_TIME = 1, 4_102_444_800  # seconds: 1970-01-01T00:00:01 .. 2100-01-01 (exclusive), UTC
MISSING_ID_TOKENS = frozenset({"", "null", "none", "nan", "na", "n/a", "<na>", "\\n"})
# Test hook: seconds to sleep after each file written into the temporary folder (kill-mid-write tests).
PAUSE_ENV = "DATA_PREP_TEST_PAUSE_AFTER_FILE"


class DataPrepError(Exception):
    """A problem with an input file that a person must fix; the message names the file (and line)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path, self.line = path, line
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


@dataclass
class ProtocolConfig:
    """How samples are cut; every field is written to stats.json."""

    name: Protocol = "d3"
    max_history: int | None = None  # None -> DEFAULT_MAX_HISTORY[name]
    min_rating: float | None = None  # None -> every rating is an interaction
    k_core: int = 0  # 0 -> no k-core filter
    start: str | None = None  # inclusive, "YYYY-MM-DD" (UTC)
    end: str | None = None  # exclusive, "YYYY-MM-DD" (UTC)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DEFAULT_MAX_HISTORY:
            raise DataPrepError(f"--protocol must be one of {sorted(DEFAULT_MAX_HISTORY)}, got {self.name!r}")
        if self.max_history is None:
            self.max_history = DEFAULT_MAX_HISTORY[self.name]
        if self.max_history < 1:
            raise DataPrepError(f"--max-history must be >= 1, got {self.max_history}")
        if self.k_core < 0:
            raise DataPrepError(f"--k-core must be >= 0, got {self.k_core}")
        if self.min_rating is not None and not math.isfinite(self.min_rating):
            raise DataPrepError(f"--min-rating must be a finite number, got {self.min_rating}")

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "max_history", "min_rating", "k_core", "start", "end")}
        d["seed"] = self.seed
        d["tie_break"] = "per user: (timestamp, file order); d3 global order: (target timestamp, file order)"
        if self.name == "d3":
            d["split_fractions"] = list(D3_FRACTIONS)
            d["split_rule"] = "position cut floor(0.8N), floor(0.9N) of the time-sorted samples (D3)"
        else:
            d["split_rule"] = "per user: last = test, second-last = valid, earlier (history >= 1) = train"
        return d


@dataclass
class Drops:
    """Counts of dropped rows by reason; every row that does not reach the output is counted once.

    ``lines``: raw lines skipped before they became rows (blank lines, missing ids: ``reason:file``);
    ``values``: values that could not be used and were left empty (the row itself is kept).
    """

    interactions: Counter = field(default_factory=Counter)
    items: Counter = field(default_factory=Counter)
    lines: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            k: dict(sorted(getattr(self, k).items())) for k in ("lines", "items", "interactions", "values")
        }


# ----------------------------------------------------------------------------- strict values

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _exact_int(d: Decimal, what: str, shown, path, line) -> int:
    if not d.is_finite():
        raise DataPrepError(f"{what} is {shown!r}, not an integer", path, line)
    if d.adjusted() > 18:  # also keeps int() away from numbers like 1e999999999
        raise DataPrepError(f"{what} is out of range: {shown!r}", path, line)
    if d != d.to_integral_value():
        raise DataPrepError(f"{what} is not an integer: {shown!r}", path, line)
    return int(d)


def parse_int(text: str, what: str, path: Path | None = None, line: int | None = None) -> int:
    """An integer written as decimal text ("42", "42.0", "4.2e1"), parsed exactly (never through float)."""
    s = text.strip()
    if not _NUMBER.fullmatch(s):
        raise DataPrepError(f"{what} is not a number: {text!r}", path, line)
    return _exact_int(Decimal(s), what, text, path, line)


def json_int(value, what: str, path: Path | None = None, line: int | None = None) -> int:
    """An integer from a parsed JSON / Python literal value (parse JSON with ``parse_float=Decimal``)."""
    if value is None:
        raise DataPrepError(f"{what} is null, not an integer", path, line)
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise DataPrepError(
            f"{what} is a {type(value).__name__}, not an integer: {str(value)[:40]!r}", path, line
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataPrepError(f"{what} is {value!r}, not an integer", path, line)
        value = Decimal(value)
    if isinstance(value, int):
        value = Decimal(value)
    return _exact_int(value, what, str(value), path, line)


def check_time(t: int, what: str, path: Path | None = None, line: int | None = None) -> int:
    """A Unix time in seconds within [MIN_TIME, MAX_TIME); anything else stops the run."""
    if MIN_TIME <= t < MAX_TIME:
        return t
    hint = (
        " (it looks like milliseconds; the files must hold seconds)"
        if t // 1000 in range(MIN_TIME, MAX_TIME)
        else ""
    )
    raise DataPrepError(f"{what} {t} is not a time between 1970 and 2100 in seconds{hint}", path, line)


def text_id(value: str) -> str | None:
    """A stripped id from a text file, or None when it is blank or a null marker ("null", "NaN" ...)."""
    s = value.strip()
    return None if s.lower() in MISSING_ID_TOKENS else s


def json_id(value, what: str, path: Path, line: int) -> str | None:
    """An id from a JSON / Python literal value: a string or an integer; None / blank -> None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        kind = (
            "a number with a fraction" if isinstance(value, float | Decimal) else f"a {type(value).__name__}"
        )
        raise DataPrepError(f"{what} is {kind}, not a string: {str(value)[:40]!r}", path, line)
    s = str(value)
    return s if s.strip() else None


# ----------------------------------------------------------------------------- text files


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_encoding(name: str) -> str:
    """The codec name of ``--encoding``; encodings whose lines cannot be split on the byte \\n are refused."""
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise DataPrepError(f"--encoding {name!r} is not a known text encoding") from None
    if codec.startswith(("utf-16", "utf-32")):
        raise DataPrepError(f"--encoding {name} is not supported; save the files as UTF-8")
    return codec


def detect_encoding(path: Path, requested: str = "auto", fallback: str | None = "latin-1") -> str:
    """``requested`` unless "auto"; auto: "utf-8-sig" (UTF-8 with a byte-order mark), "utf-8" when the
    whole file is valid UTF-8, else ``fallback`` (None: the file must be UTF-8)."""
    if requested != "auto":
        check_encoding(requested)
        return requested
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataPrepError(f"cannot read the file ({e})", path) from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataPrepError(
            "the file is UTF-16/32 text (it starts with that byte-order mark); save it as UTF-8", path
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if fallback is None:
            raise DataPrepError(
                f"not valid UTF-8 text ({e.reason})", path, data[: e.start].count(b"\n") + 1
            ) from None
        return fallback
    return "utf-8-sig" if data.startswith(codecs.BOM_UTF8) else "utf-8"


def progress(iterable, what: str, unit: str):
    """`iterable` with a progress bar on stderr (tqdm: a count and a rate, refreshed every few seconds);
    nothing shows for work done within 3 s (tests, small files)."""
    from tqdm import tqdm

    return tqdm(
        iterable, desc=what, unit=f" {unit}", unit_scale=True, delay=3, mininterval=5, file=sys.stderr
    )


def iter_lines(path: Path, encoding: str = "utf-8"):
    """Yield (1-based line number, line without its line end) of a text file, .gz allowed.

    Lines are split on b"\\n" and decoded one by one, so an undecodable byte names its line. A UTF-8
    byte-order mark at the start is dropped (utf-8 / utf-8-sig); with another encoding it is an error.
    """
    codec = check_encoding(encoding)
    utf8 = codec in ("utf-8", "utf-8-sig")
    try:
        with _open_binary(path) as f:
            for i, raw in enumerate(progress(f, f"reading {path.name}", "lines"), 1):
                if i == 1 and raw.startswith(codecs.BOM_UTF8):
                    if not utf8:
                        raise DataPrepError(
                            f"the file starts with a UTF-8 byte-order mark but is read as {encoding}; "
                            "pass --encoding utf-8 (or auto)",
                            path,
                            1,
                        )
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    line = raw.decode("utf-8" if utf8 else codec)
                except UnicodeDecodeError as e:
                    raise DataPrepError(
                        f"not valid {encoding} text at byte {e.start + 1} of the line ({e.reason}); "
                        "pass the file's --encoding",
                        path,
                        i,
                    ) from None
                yield i, line.rstrip("\r\n")
    except (OSError, EOFError, zlib.error) as e:  # e.g. a truncated or fake .gz, a folder, no permission
        raise DataPrepError(f"cannot read the file ({e})", path) from e


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataPrepError(f"{what} not found", path)
    if path.stat().st_size == 0:
        raise DataPrepError(f"{what} is empty", path)
    return path


def natural_order(raw_ids: pd.Series) -> list[str]:
    """Unique raw ids sorted numerically when all are digits, else as strings (deterministic)."""
    uniq = pd.unique(raw_ids.astype(str))
    if all(s.isdigit() for s in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def date_to_seconds(date: str, flag: str) -> int:
    try:
        return int(pd.Timestamp(date, tz="UTC").timestamp())
    except ValueError as e:
        raise DataPrepError(f"{flag} must be a date like 2016-10-01, got {date!r}") from e


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


# ----------------------------------------------------------------------------- the output folder


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


# ----------------------------------------------------------------------------- filtering


def _k_core(inter: pd.DataFrame, k: int, drops: Drops) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than k interactions until none is left."""
    while True:
        user_n = inter.groupby("raw_user_id")["raw_item_id"].transform("size")
        item_n = inter.groupby("raw_item_id")["raw_user_id"].transform("size")
        keep = (user_n >= k) & (item_n >= k)
        if keep.all():
            return inter
        drops.interactions[f"{k}_core"] += int((~keep).sum())
        inter = inter[keep]


def filter_interactions(
    items: pd.DataFrame, inter: pd.DataFrame, cfg: ProtocolConfig, drops: Drops
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply the filters listed in the module docstring; return (kept items, kept interactions)."""
    inter = inter.copy()
    inter["order"] = np.arange(len(inter), dtype=np.int64)
    if cfg.min_rating is not None:
        if "rating" not in inter:
            raise DataPrepError("--min-rating was given but this source has no ratings")
        low = inter["rating"] < cfg.min_rating
        drops.interactions["below_min_rating"] += int(low.sum())
        inter = inter[~low]
    if cfg.start is not None or cfg.end is not None:
        lo = date_to_seconds(cfg.start, "--start") if cfg.start else -(2**62)
        hi = date_to_seconds(cfg.end, "--end") if cfg.end else 2**62
        out = (inter["timestamp"] < lo) | (inter["timestamp"] >= hi)
        drops.interactions["out_of_window"] += int(out.sum())
        inter = inter[~out]
    # Items the source dropped (missing / html / long title ...) take their interactions with them.
    reason = items.set_index("raw_item_id")["drop_reason"]
    r = inter["raw_item_id"].map(reason)
    for why, n in r.dropna().value_counts().sort_index().items():
        drops.interactions[why] += int(n)
    inter = inter[r.isna()]
    dup = inter.sort_values(["timestamp", "order"], kind="stable").duplicated(["raw_user_id", "raw_item_id"])
    drops.interactions["duplicate"] += int(dup.sum())
    inter = inter.drop(index=dup[dup].index)
    if cfg.k_core > 0:
        inter = _k_core(inter, cfg.k_core, drops)
    if cfg.name == "loo":  # one train/valid/test target each needs >= 3 interactions
        short = inter.groupby("raw_user_id")["raw_item_id"].transform("size") < 3
        drops.interactions["loo_user_under_3"] += int(short.sum())
        inter = inter[~short]
    for why, n in items["drop_reason"].dropna().value_counts().sort_index().items():
        drops.items[why] += int(n)
    kept = items[items["drop_reason"].isna()]
    used = kept["raw_item_id"].isin(set(inter["raw_item_id"]))
    drops.items["no_interactions_left"] += int((~used).sum())
    drops.interactions = +drops.interactions  # remove zero counts
    drops.items = +drops.items
    return kept[used], inter.sort_values("order", kind="stable")


# ----------------------------------------------------------------------------- protocols


def make_samples(inter: pd.DataFrame, cfg: ProtocolConfig) -> pd.DataFrame:
    """Cut samples from dense interactions (user_id, item_id, timestamp, order); see module docstring."""
    inter = inter.sort_values(["user_id", "timestamp", "order"], kind="stable")
    users = inter["user_id"].to_numpy()
    items = inter["item_id"].to_numpy()
    times = inter["timestamp"].to_numpy()
    orders = inter["order"].to_numpy()
    rows: list[tuple] = []
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    h = cfg.max_history
    for s, e in zip(starts, ends):
        n = e - s
        for j in range(1, n):  # target index within the user; >= 1 item of history
            if cfg.name == "loo":
                split = "test" if j == n - 1 else "valid" if j == n - 2 else "train"
            else:
                split = ""
            hist = items[s + max(0, j - h) : s + j].tolist()
            rows.append(
                (int(users[s]), hist, int(items[s + j]), int(times[s + j]), split, int(orders[s + j]))
            )
    df = pd.DataFrame(rows, columns=["user_id", "history", "target", "target_timestamp", "split", "order"])
    if cfg.name == "d3":
        df = df.sort_values(["target_timestamp", "order"], kind="stable").reset_index(drop=True)
        n = len(df)
        a, b = math.floor(D3_FRACTIONS[0] * n), math.floor((D3_FRACTIONS[0] + D3_FRACTIONS[1]) * n)
        df["split"] = np.where(np.arange(n) < a, "train", np.where(np.arange(n) < b, "valid", "test"))
    return df


def _boundary_ties(samples: pd.DataFrame) -> dict:
    """How many samples share their target second with a sample of the previous split (d3 only)."""
    out = {}
    for prev, nxt in (("train", "valid"), ("valid", "test")):
        a = samples.loc[samples["split"] == prev, "target_timestamp"]
        b = samples.loc[samples["split"] == nxt, "target_timestamp"]
        out[f"{prev}/{nxt}"] = 0 if a.empty or b.empty else int((b == a.max()).sum() + (a == b.min()).sum())
    return out


def check_samples(samples: pd.DataFrame) -> None:
    """Invariants every protocol must satisfy; a failure here is a bug in this module, not in the data."""
    for hist, target in zip(samples["history"], samples["target"]):
        assert len(hist) >= 1 and target not in hist, "target inside its own history"


# ----------------------------------------------------------------------------- the whole build

ITEM_BASE = [("item_id", pa.int64()), ("title", pa.string()), ("raw_item_id", pa.string())]
USERS_SCHEMA = pa.schema([("user_id", pa.int64()), ("raw_user_id", pa.string())])
INTER_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
SAMPLES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("history", pa.list_(pa.int64())),
        ("target", pa.int64()),
        ("target_timestamp", pa.int64()),
        ("split", pa.string()),
    ]
)


def input_record(path: Path, encoding: str | None = None) -> dict:
    rec = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return rec if encoding is None else rec | {"encoding": encoding}


def build_dataset(
    *,
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    cfg: ProtocolConfig,
    output: str | Path,
    input_files: list[Path],
    source: dict,
    drops: Drops | None = None,
    extra_stats: dict | None = None,
    encodings: dict[str, str] | None = None,
) -> dict:
    """Filter, remap, cut samples and write the processed contract (described above); return stats.

    Everything (parquet bytes, stats.json) is built and checked in memory first; the folder is written
    last, atomically (``write_output``), under the output's lock (taken here unless the caller holds it).
    """
    drops = drops or Drops()
    if "drop_reason" not in items:
        items = items.assign(drop_reason=None)
    raw = {
        "users": int(interactions["raw_user_id"].nunique()),
        "items": int(len(items)),
        "interactions": int(len(interactions)),
    }
    kept_items, inter = filter_interactions(items, interactions, cfg, drops)
    # Self-check: every raw row is either kept or counted under a reason.
    assert raw["interactions"] == len(inter) + sum(drops.interactions.values())
    assert raw["items"] == len(kept_items) + sum(drops.items.values())
    out = resolve_output(output)
    if inter.empty:
        raise DataPrepError(
            f"no interactions left after filtering (dropped: {_dropped_text(drops)}); nothing was written",
            out,
        )

    item_order = natural_order(kept_items["raw_item_id"])
    item_ids = {raw_id: i for i, raw_id in enumerate(item_order)}
    user_order = natural_order(inter["raw_user_id"])
    user_ids = {raw_id: i for i, raw_id in enumerate(user_order)}
    items_out = kept_items.assign(item_id=kept_items["raw_item_id"].map(item_ids).astype("int64"))
    items_out = items_out.sort_values("item_id").reset_index(drop=True)
    text_cols = [c for c in items_out.columns if c not in ("item_id", "title", "raw_item_id", "drop_reason")]
    items_out = items_out[["item_id", "title", "raw_item_id", *text_cols]]
    dense = pd.DataFrame(
        {
            "user_id": inter["raw_user_id"].map(user_ids).astype("int64").to_numpy(),
            "item_id": inter["raw_item_id"].map(item_ids).astype("int64").to_numpy(),
            "timestamp": inter["timestamp"].astype("int64").to_numpy(),
            "order": inter["order"].to_numpy(),
        }
    )
    samples = make_samples(dense, cfg)
    check_samples(samples)
    counts = {s: int((samples["split"] == s).sum()) for s in SPLITS}
    empty = [s for s in SPLITS if counts[s] == 0]
    if empty:
        got = ", ".join(f"{s} {n}" for s, n in counts.items())
        raise DataPrepError(
            f"the {empty[0]} split would be empty ({len(samples)} samples: {got}); use more data or fewer "
            "filters, nothing was written",
            out,
        )

    item_schema = pa.schema(ITEM_BASE + [(c, pa.string()) for c in text_cols])
    users_out = pd.DataFrame(
        {"user_id": np.arange(len(user_order), dtype=np.int64), "raw_user_id": user_order}
    )
    inter_out = dense.sort_values(["user_id", "timestamp", "order"], kind="stable")
    files = {
        "items.parquet": parquet_bytes(items_out, item_schema),
        "users.parquet": parquet_bytes(users_out, USERS_SCHEMA),
        "interactions.parquet": parquet_bytes(inter_out[["user_id", "item_id", "timestamp"]], INTER_SCHEMA),
        "samples.parquet": parquet_bytes(samples.drop(columns="order"), SAMPLES_SCHEMA),
    }

    hist_len = samples["history"].map(len)
    stats = {
        "source": source,
        "protocol": cfg.as_dict(),
        "raw": raw,
        "filtered": {
            "users": len(user_order),
            "items": len(item_order),
            "interactions": len(inter),
        },
        "dropped": drops.as_dict(),
        "samples": counts | {"total": len(samples)},
        "avg_history_length": {s: round(float(hist_len[samples["split"] == s].mean()), 4) for s in SPLITS}
        | {"all": round(float(hist_len.mean()), 4)},
        # Titles shared by several items (ML-100K has a few re-listed movies); kept, but reported,
        # because a title trie cannot tell such items apart.
        "duplicate_title_groups": int(
            items_out.loc[items_out["title"].duplicated(keep=False), "title"].nunique()
        ),
    }
    if cfg.name == "d3":
        stats["d3_boundary_ties"] = _boundary_ties(samples)
    stats.update(extra_stats or {})
    encodings = encodings or {}
    stats["files"] = {
        "inputs": {p.name: input_record(p, encodings.get(p.name)) for p in input_files},
        "outputs": output_hashes(files),
    }
    files[STATS_FILE] = (json.dumps(stats, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
    if out in _HELD:
        write_output(out, files)
    else:
        with locked_output(out) as locked:
            write_output(locked, files)
    return stats


def _dropped_text(drops: Drops) -> str:
    d = drops.as_dict()
    return ", ".join(f"{k} {k2}: {v:,}" for k in d for k2, v in d[k].items()) or "nothing"


def print_summary(stats: dict, output: str | Path) -> None:
    s, f, r = stats["samples"], stats["filtered"], stats["raw"]
    print(
        f"raw: {r['users']:,} users, {r['items']:,} items, {r['interactions']:,} interactions -> "
        f"kept: {f['users']:,} users, {f['items']:,} items, {f['interactions']:,} interactions"
    )
    print(
        f"samples ({stats['protocol']['name']}): train {s['train']:,}, valid {s['valid']:,}, "
        f"test {s['test']:,}; avg history {stats['avg_history_length']['all']}"
    )
    d = stats["dropped"]
    dropped = ", ".join(f"{k} {k2}: {v:,}" for k in d for k2, v in d[k].items())
    print(f"dropped: {dropped or 'nothing'}")
    print(f"wrote {output}/{{items,users,interactions,samples}}.parquet and stats.json")


def run_main(fn, argv=None) -> int:
    """Call fn(argv); turn DataPrepError into one sentence on stderr and exit code 2."""
    try:
        fn(argv)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
