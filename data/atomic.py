"""Crash-safe file writes: a temporary file beside the target, fsync, rename, fsync of the folder.

A kill -9 or a full disk at any moment leaves either the old file or the new one, never a half-written
or empty one. A failed write (ENOSPC, EDQUOT, EIO) removes its temporary file and raises `WriteFailed`,
whose message names the file and says that its previous content is intact.

`NOISYMIX_FAULT=<file name>:<n>` (tests only) kills the process with SIGKILL at the n-th write of that
file, after the temporary file is written and before the rename: the fault-injection suite uses it to
hit every write of the run folder.
"""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from typing import Callable, IO

_FAULT_COUNTS: dict[str, int] = {}


class WriteFailed(OSError):
    """A file could not be written (disk full, quota, I/O error); the previous version is untouched."""


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fault_point(path: Path) -> None:
    spec = os.environ.get("NOISYMIX_FAULT", "")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name != path.name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def temporary_path(path: Path) -> Path:
    """Where a write of `path` goes before its rename: `.NAME.tmp-PID` beside it (remove_stale_temporaries
    knows the pattern)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then replace `path` with it atomically."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _fault_point(path)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = errno.errorcode.get(e.errno, "") if e.errno else ""
        raise WriteFailed(e.errno, f"cannot write {path}: {e.strerror or e}" + (f" ({reason})" if reason else "")
                          + "; its previous content is intact") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files that a killed writer left in `folder` (`.NAME.tmp-PID`); returns how many."""
    count = 0
    for tmp in Path(folder).glob(".*.tmp-*"):
        try:
            tmp.unlink()
            count += 1
        except OSError:
            pass
    return count
