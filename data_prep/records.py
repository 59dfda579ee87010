"""Reading the files of ``data_prep.interactions``: which format a file is in, its records as
(line or row number, {column: value}) for CSV / TSV, JSON Lines, Parquet and RecBole atomic files, and the
parsers of one id, title or rating cell. Formats, columns and checks are described in
``data_prep.interactions``; every bad file or value stops the run with a ``DataPrepError`` naming the file,
the line or row and the column.
"""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from functools import partial
from pathlib import Path

from data_prep.parsing import _NUMBER, DataPrepError, atomic_rows, iter_lines, json_id, object_lines, text_id
from data_prep.protocols import Drops

FORMATS = ("csv", "tsv", "jsonl", "parquet", "recbole")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".inter": "recbole",
    ".item": "recbole",
}
DELIMITERS = {"csv": ",", "tsv": "\t"}


def file_format(path: Path, fmt: str | None) -> str:
    """The format named by ``--format``, else by the extension (``.gz`` aside)."""
    if fmt:
        if fmt not in FORMATS:
            raise DataPrepError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    ext = suffixes[0].lower() if suffixes else ""
    if ext not in EXTENSIONS:
        raise DataPrepError(
            f"cannot tell the format from the extension {''.join(suffixes) or '(none)'!r}; name it with "
            f"--format ({', '.join(FORMATS)})",
            path,
        )
    if EXTENSIONS[ext] == "parquet" and path.suffix == ".gz":
        raise DataPrepError("a gzipped Parquet file is not read; Parquet is compressed inside", path)
    return EXTENSIONS[ext]


def _missing_column(path: Path, line: int, column: str, flag: str, have) -> DataPrepError:
    return DataPrepError(
        f"column {column!r} is not in the file (its columns: {', '.join(map(str, have)) or 'none'}); "
        f"name the right one with {flag}",
        path,
        line,
    )


def _csv_records(path: Path, sep: str, need: dict[str, str], drops: Drops):
    state = {"line": 0}

    def lines():
        for i, line in iter_lines(path):
            state["line"] = i
            yield line + "\n"

    reader = csv.reader(lines(), delimiter=sep, strict=True)
    end = 0
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header or header == [""]:
            raise DataPrepError("the file has no header line", path, 1)
        if len(header) == 1:
            other = next((d for d in (",", "\t", ";", "|") if d != sep and d in header[0]), None)
            if other is not None:
                raise DataPrepError(
                    f"column 1: the header {header[0][:60]!r} holds no {sep!r} but {other!r}: the file is "
                    f"{other!r}-separated, not {sep!r}-separated as declared; pass --sep {other!r} (or the "
                    "right --format)",
                    path,
                    1,
                )
        for col, flag in need.items():
            if col not in header:
                raise _missing_column(path, 1, col, flag, header)
        index = {c: header.index(c) for c in need}
        end = state["line"]
        for row in reader:
            start, end = end + 1, state["line"]
            if not row or (len(row) == 1 and not row[0].strip()):
                drops.lines[f"blank:{path.name}"] += 1
                continue
            if len(row) != len(header):
                raise DataPrepError(
                    f"expected {len(header)} {sep!r}-separated fields (as the header), got {len(row)}: "
                    f"{sep.join(row)[:80]!r}",
                    path,
                    start,
                )
            yield start, {c: row[k] for c, k in index.items()}
    except csv.Error as e:
        raise DataPrepError(
            f"not valid {'CSV' if sep == ',' else 'delimited'} text ({e})", path, state["line"]
        ) from None


def _jsonl_records(path: Path, need: dict[str, str], drops: Drops):
    for i, rec in object_lines(path, partial(json.loads, parse_float=Decimal), "JSON", drops.lines):
        for col, flag in need.items():
            if col not in rec:
                raise _missing_column(path, i, col, flag, rec)
        yield i, {c: rec[c] for c in need}


def _parquet_records(path: Path, need: dict[str, str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        for col, flag in need.items():
            if col not in names:
                raise _missing_column(path, None, col, flag, names)
        table = pf.read(columns=list(need))
    except (OSError, pa.ArrowException) as e:
        raise DataPrepError(f"not a readable Parquet file ({e})", path) from None
    cols = {c: table.column(c).to_pylist() for c in need}
    for r in range(table.num_rows):
        yield r + 1, {c: cols[c][r] for c in need}


def records(path: Path, fmt: str, need: dict[str, str], drops: Drops, sep: str | None = None):
    """Yield (line or row number, {column: value}) of the ``need`` columns ({column: its flag}) of a file."""
    if fmt in DELIMITERS:
        return _csv_records(path, sep or DELIMITERS[fmt], need, drops)
    if fmt == "jsonl":
        return _jsonl_records(path, need, drops)
    if fmt == "parquet":
        return _parquet_records(path, need)
    return atomic_rows(path, tuple(need), drops)


def parse_id(value, column: str, path: Path, line: int) -> str | None:
    if isinstance(value, str):
        return text_id(value)
    return json_id(value, f"column {column!r}", path, line)


def parse_title(value, column: str, path: Path, line: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataPrepError(f"column {column!r}: the title is a {type(value).__name__}, not text", path, line)
    title = " ".join(value.split())
    return None if text_id(title) is None else title


def parse_rating(value, column: str, path: Path, line: int) -> float:
    d = None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        d = Decimal(value.strip())
    elif isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        d = Decimal(value)
    if d is None or not d.is_finite() or d.adjusted() > 18:
        raise DataPrepError(f"column {column!r}: the rating {str(value)[:40]!r} is not a number", path, line)
    return float(d)
