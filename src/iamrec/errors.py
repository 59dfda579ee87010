"""The error policy of every iamrec command (the ground floor: it imports nothing else of iamrec).

Expected failures are printed as one sentence, ``<program>: error: ...``, exit status 2 (`USAGE`), no
traceback: the command line and config files (jsonargparse's errors), iamrec's and data_prep's own errors
(every exception class defined in those packages, and every ValueError raised by iamrec's, Lightning's or
jsonargparse's own checks), Lightning's configuration errors, and the disk refusing a file (not found,
permission, full, read-only: ENOSPC, EROFS, EACCES, ...). Everything else keeps its traceback: CUDA out of
memory, NCCL and other distributed errors, other RuntimeErrors, a ValueError raised inside
torch/transformers, bugs. ``IAMREC_DEBUG=1`` shows the traceback of an expected error too.

Exit statuses: `OK` 0; `PARTIAL` 1 (the command ran, some of its parts failed and were reported: cell-seeds
of a table, lines of a histories file); `USAGE` 2 (an expected error: nothing, or nothing more, was done).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

OK, PARTIAL, USAGE = 0, 1, 2

# OSErrors that are the disk's or the user's doing, reported as one sentence.
DISK_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }
)
# Packages whose own `raise ValueError(...)` is a check of the user's input, not a bug.
CHECKING_PACKAGES = ("iamrec", "data_prep", "lightning", "jsonargparse")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only folder); the previous checkpoint is intact."""


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _raised_in(err: BaseException) -> str:
    """The module of the innermost frame of `err`'s traceback (where it was raised)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""


def _ours(err: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] in ("iamrec", "data_prep") for cls in type(err).__mro__[:-2])


def expected_error(err: BaseException) -> str | None:
    """The one sentence for an expected failure (see the module docstring), or None: keep the traceback."""
    if _ours(err) and not isinstance(err, OSError):  # e.g. a DataPrepError: no Lightning import for it
        return one_line(err)
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, ArgumentError):
        return one_line(err).rstrip(".") + " (--help lists the options)."
    if type(err).__module__.split(".")[0] == "jsonargparse":  # e.g. its PathError: a file it cannot write
        return one_line(err)
    if isinstance(err, OSError):
        if isinstance(err, CheckpointWriteError):
            return f"{err.strerror}."
        if isinstance(err, (FileNotFoundError, PermissionError)) or err.errno in DISK_ERRNOS:
            name = errno.errorcode.get(err.errno or 0, "")
            where = f"{err.filename}: " if err.filename else ""
            return f"{where}{err.strerror or one_line(err).rstrip('.')}" + (f" ({name})." if name else ".")
        return None
    if _ours(err) or isinstance(err, MisconfigurationException):
        return one_line(err)
    if isinstance(err, ValueError) and _raised_in(err).split(".")[0] in CHECKING_PACKAGES:
        return one_line(err)
    return None


def guarded(fn: Callable[[], Any], program: str | None = "iamrec") -> Any:
    """`fn()` under the CLI's error policy: an expected failure becomes one sentence and exit status 2.

    The sentence reads ``<program>: error: ...``; with ``program=None`` just ``error: ...`` (data_prep's
    commands)."""
    try:
        return fn()
    except Exception as err:
        message = expected_error(err)
        if message is None or os.environ.get("IAMREC_DEBUG"):
            raise
        print(f"{program}: error: {message}" if program else f"error: {message}", file=sys.stderr)
        raise SystemExit(USAGE) from None
