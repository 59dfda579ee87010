"""One runs folder, one writer: the lock a `reproduce` run, a sitting and a merge hold on their runs root, and
the stage processes that die with the process that started them.

**The lock** is a file ``<root>/.writer.lock`` holding the writer's pid (and, on Linux, the process's start
time, so a reused pid is not mistaken for the writer), created with ``O_EXCL``. A second writer refuses
(`RunsLocked`, one sentence naming the root and the pid) while the lock's process is alive; the lock of a
process that died (SIGKILL, a lost machine) is taken over with a notice on stderr. Locks are checked around
the root too: a lock on an enclosing folder (a sitting's ``results/runs``) or on a root inside it (a
`reproduce` of one table, two levels down) held by another live process refuses as well; one held by the
process itself or one of its ancestors (the sitting that started this `reproduce`) does not.

**Children** (`popen`): on Linux each stage process asks the kernel for SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), so a SIGKILLed `reproduce` or sitting leaves no fit running; they stay in
the parent's process group, so a terminal's Ctrl-C and a ``killpg`` of the parent's group reach them too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

LOCK_FILE = ".writer.lock"
LOCK_DEPTH = 2  # roots inside a locked root that are checked: <runs>/<profile>/<table>
PR_SET_PDEATHSIG = 1


class RunsLocked(RuntimeError):
    """Another live process writes into the runs root."""


# ------------------------------------------------------------------------------------------ processes


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` runs (not a zombie; with `start`, the same process that recorded it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    if _state(pid) in ("Z", "X"):
        return False
    return start is None or _start_time(pid) in (None, start)


def ancestors() -> set[int]:
    """This process and its ancestors' pids (Linux: the /proc chain; elsewhere: this one and its parent)."""
    pids, pid = {os.getpid()}, os.getppid()
    for _ in range(64):
        if pid <= 1 or pid in pids:
            break
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    return None


_PRCTL = _prctl()  # looked up once, before any fork: the child only calls it


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGTERM when the parent dies (and now, if it died already)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died between fork and prctl
        os.kill(os.getpid(), signal.SIGTERM)


def popen(argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` of a child that dies with this process (Linux: PR_SET_PDEATHSIG, SIGTERM).

    The death signal follows the *thread* that forks: call it from a thread that waits for the child."""
    if _PRCTL is not None and "preexec_fn" not in kwargs:
        parent = os.getpid()
        kwargs["preexec_fn"] = lambda: _die_with(parent)
    return subprocess.Popen(list(argv), **kwargs)


# ------------------------------------------------------------------------------------------------ lock


def _read(path: Path) -> tuple[int, str | None] | None:
    """(pid, start time) of a lock file; None when it is gone. An unreadable one reads as pid 0 (stale)."""
    for _ in range(20):  # a lock created with O_EXCL an instant ago may not hold its pid yet
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return 0, None
        if text.strip():
            break
        time.sleep(0.05)
    lines = text.split()
    try:
        pid = int(lines[0])
    except (ValueError, IndexError):
        return 0, None
    start = next((w.split("=", 1)[1] for w in lines[1:] if w.startswith("start=")), None)
    return pid, start


def _held_by_other(path: Path) -> int | None:
    """The pid of another live process holding the lock file `path`, or None."""
    got = _read(path)
    if got is None:
        return None
    pid, start = got
    if pid in ancestors() or not alive(pid, start):
        return None
    return pid


def _around(root: Path) -> Iterator[Path]:
    """The lock files of the folders enclosing `root` and of the roots inside it (LOCK_DEPTH levels)."""
    for parent in root.resolve().parents:
        yield parent / LOCK_FILE
    for depth in range(1, LOCK_DEPTH + 1):
        yield from sorted(root.glob("/".join(["*"] * depth) + "/" + LOCK_FILE))


def _refusal(root: Path, pid: int, lock: Path) -> RunsLocked:
    where = "it" if lock.parent == root else str(lock.parent)
    return RunsLocked(
        f"{root} is not written now: another process (pid {pid}) writes into {where} (lock {lock}); one runs "
        "folder has one writer: wait for that process to end, or stop it, then run this again."
    )


@contextlib.contextmanager
def runs_lock(root: str | Path) -> Iterator[None]:
    """Hold the writer lock of `root` (created if absent) for the block; `RunsLocked` when another live
    process holds it or a lock around it. Reentrant for this process and its children."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    for other in _around(root):
        pid = _held_by_other(other) if other != path else None
        if pid is not None:
            raise _refusal(root, pid, other)
    owned = _acquire(root, path)
    try:
        yield
    finally:
        if owned:
            got = _read(path)
            if got is not None and got[0] == os.getpid():
                with contextlib.suppress(OSError):
                    path.unlink()


def _create(path: Path) -> bool:
    """Create the lock with O_EXCL holding this pid; False when it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        start = _start_time(os.getpid())
        f.write(f"{os.getpid()}\n" + (f"start={start}\n" if start else ""))
    return True


def _acquire(root: Path, path: Path) -> bool:
    """Take the lock; returns whether this process created it (False: held by itself or an ancestor)."""
    for _ in range(3):
        if _create(path):
            return True
        got = _read(path)
        if got is None:
            continue  # released an instant ago: try again
        if got[0] in ancestors() and alive(*got):
            return False  # ours already, or the sitting's that started us
        if alive(*got):
            raise _refusal(root, got[0], path)
        # stale: take it over; takers are serialised on the folder and check again under that lock
        fd = os.open(root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _read(path) == got:
                path.unlink()
            if not _create(path):
                continue  # another taker was first: judge its lock
        finally:
            os.close(fd)  # releases the flock
        why = "an unreadable lock" if got[0] == 0 else f"pid {got[0]}, which no longer runs"
        print(f"notice: took over the writer lock {path} from {why}.", file=sys.stderr, flush=True)
        return True
    raise RunsLocked(f"{root} is not written now: its lock {path} keeps changing hands; run this again.")
