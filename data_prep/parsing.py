"""Strict reading of raw files, shared by every `data_prep.<source>` module: values, ids and text lines.

Each value is parsed in its own type and never passes through float. Integers (times, ratings) are parsed
exactly (``parse_int`` / ``json_int``: "3", "3.0" and "3e0" are 3; "3.5", "NaN", "Infinity", "1e400" and
"three" stop the run), times must lie in [1970-01-01T00:00:01, 2100-01-01) in seconds (``check_time``; a
time in milliseconds is named as such). A blank or null id ("", "null", "NaN", JSON null ...) never
becomes an id: its line is dropped and counted (``missing_user_id:<file>`` ...) — when no usable line is
left the run stops naming the first bad line. Text files are read as bytes and decoded line by line, so a
decoding error names its line; a UTF-8 byte-order mark is removed, never glued to the first id;
``detect_encoding`` picks UTF-8 when the whole file is valid UTF-8, else the source's fallback (latin-1
for the GroupLens files), and a source may take an ``--encoding``. A bad value stops the run with one
sentence naming the file and line (``DataPrepError``; exit code 2 from ``python -m data_prep.<source>``);
nothing is written.
"""

from __future__ import annotations

import codecs
import gzip
import math
import re
import sys
import zlib
from datetime import datetime, timezone
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pandas as pd

MIN_TIME, MAX_TIME = 1, 4_102_444_800  # seconds: 1970-01-01T00:00:01 .. 2100-01-01 (exclusive), UTC
MISSING_ID_TOKENS = frozenset({"", "null", "none", "nan", "na", "n/a", "<na>", "\\n"})


class DataPrepError(Exception):
    """A problem with an input file that a person must fix; the message names the file (and line)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path, self.line = path, line
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


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
    i = 0
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
        if i:  # lines were read: name where the file breaks off (a .gz that ends early)
            raise DataPrepError(f"the file breaks off after line {i} ({e})", path, i + 1) from e
        raise DataPrepError(f"cannot read the file ({e})", path) from e


def object_lines(path: Path, parse, what: str, dropped):
    """(line number, dict) per non-blank line of a JSON-Lines-like file, each line parsed by `parse`; a
    blank line is counted in `dropped` (a Counter, key ``blank:<file name>``), a line that does not parse
    to a dict is a `DataPrepError` naming the file and line (`what`: "JSON", "Python dict")."""
    for i, line in iter_lines(path):
        if not line.strip():
            dropped[f"blank:{path.name}"] += 1
            continue
        try:
            rec = parse(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataPrepError(
                f"not a valid {what} line ({type(e).__name__}): {line[:80]!r}", path, i
            ) from None
        if not isinstance(rec, dict):
            raise DataPrepError(f"expected a {what} object, got {type(rec).__name__}", path, i)
        yield i, rec


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataPrepError(f"{what} not found", path)
    if path.stat().st_size == 0:
        raise DataPrepError(f"{what} is empty", path)
    return path


def date_to_seconds(date: str, flag: str) -> int:
    try:
        return int(pd.Timestamp(date, tz="UTC").timestamp())
    except ValueError as e:
        raise DataPrepError(f"{flag} must be a date like 2016-10-01, got {date!r}") from e


# ----------------------------------------------------------------------------- RecBole atomic files

ATOMIC_TYPES = frozenset({"token", "token_seq", "float", "float_seq"})


def atomic_header(path: Path, line: str, need: tuple[str, ...]) -> dict[str, int]:
    """{column name: field index} of a RecBole atomic header (tab-separated ``name:type`` fields)."""
    fields = line.split("\t")
    for k, field in enumerate(fields, 1):
        name, _, kind = field.partition(":")
        if kind not in ATOMIC_TYPES:
            what = "has no :type" if not kind else f"has the unknown type {kind!r}"
            raise DataPrepError(
                f"column {k} ({field[:40]!r}) of the RecBole atomic header {what} (expected name:type, type "
                f"one of {', '.join(sorted(ATOMIC_TYPES))}): {line[:80]!r}",
                path,
                1,
            )
    cols = {f.partition(":")[0]: k for k, f in enumerate(fields)}
    missing = [c for c in need if c not in cols]
    if missing:
        raise DataPrepError(
            f"the RecBole atomic header has no column {missing[0]!r} (its columns: {', '.join(cols)})",
            path,
            1,
        )
    return cols


def atomic_rows(path: Path, need: tuple[str, ...], drops, encoding: str = "utf-8"):
    """Yield (line number, {column: value}) of a RecBole atomic file (``.inter``, ``.item``, ...): a
    ``name:type`` header, then tab-separated fields (``token_seq`` values are space-separated tokens, one
    field). Blank lines are counted (``blank:<file>``); a line with another number of fields is an error."""
    lines = iter_lines(path, encoding)
    first = next(lines, None)
    if first is None:
        raise DataPrepError("the file has no header line", path, 1)
    cols = atomic_header(path, first[1], need)
    for i, line in lines:
        if not line.strip():
            drops.lines[f"blank:{path.name}"] += 1
            continue
        f = line.split("\t")
        if len(f) != len(cols):
            raise DataPrepError(
                f"expected {len(cols)} tab-separated fields (as the header), got {len(f)}: {line[:80]!r}",
                path,
                i,
            )
        yield i, {c: f[k] for c, k in cols.items()}


# ----------------------------------------------------------------------------- a time column

NS = 10**9
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class TimeColumn:
    """Strict reading of one time column, value by value, into exact nanoseconds since the epoch (UTC).

    A column holds one kind of time: numbers (ints, decimal text, JSON / Parquet numbers) in ``unit``
    ("s" or "ms"; fractions kept), or ISO-8601 strings / Parquet timestamps (with or without a zone: a
    naive one is UTC, counted in ``naive``). Seconds have at most 10 integer digits, milliseconds at least
    11 (every time in 1970..2100 reads so): a column that holds both, a number where the column held dates
    (or the reverse), or values in the other unit than ``unit`` stop the run naming the file, the line and
    the column, and the line (``where``: "row" for Parquet) of the first value of the other kind. The seconds of every time must lie in
    [1970-01-01T00:00:01, 2100-01-01) (``check_time``).
    """

    def __init__(self, column: str, path: Path, unit: str = "s", where: str = "line"):
        if unit not in ("s", "ms"):
            raise DataPrepError(f"--time-unit must be s or ms, got {unit!r}")
        self.column, self.path, self.unit, self.where = column, path, unit, where
        self.first: dict[str, int] = {}  # kind ("seconds", "milliseconds", "ISO-8601 date") -> first line
        self.naive = 0

    def _fail(self, message: str, line: int):
        raise DataPrepError(f"column {self.column!r}: {message}", self.path, line)

    def _kind(self, kind: str, shown, line: int) -> None:
        self.first.setdefault(kind, line)
        other = next((k for k in self.first if k != kind), None)
        if other is not None:
            self._fail(
                f"mixed time units: {self.where} {self.first[other]} holds {other}, this {self.where} {kind} "
                f"({str(shown)[:40]!r}); one column holds one unit",
                line,
            )

    def __call__(self, value, line: int) -> int:
        """The exact time of one value, in nanoseconds since 1970-01-01 UTC."""
        if isinstance(value, datetime):  # a Parquet timestamp (pandas' Timestamp is a datetime)
            return self._date(value, value, line)
        if isinstance(value, str):
            text = value.strip()
            if not text or text.lower() in MISSING_ID_TOKENS:
                self._fail(f"the time is missing ({value!r})", line)
            if not _NUMBER.fullmatch(text):
                try:
                    date = datetime.fromisoformat(text)
                except ValueError:
                    self._fail(f"{value[:40]!r} is neither a number nor an ISO-8601 date", line)
                return self._date(date, value, line)
            value = Decimal(text)
        if value is None:
            self._fail("the time is missing (null)", line)
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            self._fail(f"the time is a {type(value).__name__}: {str(value)[:40]!r}", line)
        if isinstance(value, float) and not math.isfinite(value):
            self._fail(f"the time is {value!r}", line)
        d = Decimal(value)
        if not d.is_finite() or d.adjusted() > 18:
            self._fail(f"the time {str(value)[:40]!r} is not a finite number in range", line)
        self._kind("milliseconds" if abs(d) >= 10**10 else "seconds", value, line)
        unit = "milliseconds" if self.unit == "ms" else "seconds"
        if unit not in self.first:
            hint = "pass --time-unit ms" if self.unit == "s" else "leave out --time-unit ms"
            kind = next(iter(self.first))
            self._fail(f"{str(value)[:40]!r} looks like {kind}, not {unit} ({hint})", line)
        ns = int((d * (NS if self.unit == "s" else NS // 1000)).to_integral_value(rounding=ROUND_FLOOR))
        self._check(ns, value, line)
        return ns

    def _date(self, date: datetime, shown, line: int) -> int:
        self._kind("ISO-8601 dates", shown, line)
        if date.tzinfo is None or date.utcoffset() is None:
            date, self.naive = date.replace(tzinfo=timezone.utc), self.naive + 1
        delta = date - _EPOCH
        ns = (delta.days * 86_400 + delta.seconds) * NS + delta.microseconds * 1000
        if hasattr(date, "nanosecond"):  # pandas' Timestamp keeps nanoseconds
            ns += date.nanosecond
        self._check(ns, shown, line)
        return ns

    def _check(self, ns: int, shown, line: int) -> None:
        if not MIN_TIME <= ns // NS < MAX_TIME:
            self._fail(f"{str(shown)[:40]!r} is not a time between 1970 and 2100", line)

    def stats(self) -> dict:
        """stats.json's note on how the column was read."""
        kind = next(iter(self.first), "seconds")
        note = {"column": self.column, "read_as": kind}
        if kind == "ISO-8601 dates":
            note["naive_dates_read_as_utc"] = self.naive
            if self.naive:
                note["note"] = f"{self.naive} ISO-8601 times without a zone were read as UTC"
        return note
