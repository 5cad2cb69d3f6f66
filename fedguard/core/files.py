"""Crash-safe file writes: a reader sees the old file or the new one, never half.

Failures are typed: :func:`atomic_write_bytes` raises a
:class:`~fedguard.core.errors.StorageError` (or the sub-type the caller names)
whose message names the file and the cause (:func:`describe_cause`), and leaves
no temporary file behind.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from fedguard.core.errors import StorageError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "cause_name",
    "describe_cause",
    "fsync_dir",
    "storage_error",
    "strict_json",
]

E = TypeVar("E", bound=StorageError)


# What the operator can do about a cause (the message says it after the cause).
_HINTS = {
    "ENOSPC": "free disk space",
    "EDQUOT": "free disk space (quota exceeded)",
    "EFBIG": "the file size limit was reached",
    "SQLITE_FULL": "free disk space",
    "EROFS": "the file system is read-only",
    "EACCES": "make the file and its folder writable by this user",
    "EPERM": "make the file and its folder writable by this user",
    "SQLITE_READONLY": "make the file and its folder writable by this user",
    "SQLITE_CANTOPEN": "check that the folder exists and is writable",
    "SQLITE_CORRUPT": "the file is damaged",
    "SQLITE_NOTADB": "the file is damaged or not a database",
}


def cause_name(exc: BaseException) -> str:
    """A short name for why a storage call failed: ``ENOSPC``, ``SQLITE_CORRUPT``, ..."""
    if isinstance(exc, StorageError) and exc.cause:
        return exc.cause
    if isinstance(exc, sqlite3.Error):
        return str(getattr(exc, "sqlite_errorname", None) or type(exc).__name__)
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    return type(exc).__name__


def describe_cause(exc: BaseException) -> str:
    """The cause as text: ``ENOSPC (No space left on device)``,
    ``SQLITE_CORRUPT (database disk image is malformed)``, with a hint when there is one."""
    if isinstance(exc, StorageError):
        return str(exc)
    name = cause_name(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        detail = exc.strerror or os.strerror(exc.errno)
    else:
        detail = str(exc)
    text = f"{name} ({detail})" if detail and detail != name else name
    hint = _HINTS.get(name)
    if hint is None and name.startswith("SQLITE_IOERR"):
        hint = "an I/O error: a full disk, a file size limit or a failing device"
    return f"{text}; {hint}" if hint else text


def storage_error(error: type[E], what: str, path: Path | str, exc: BaseException) -> E:
    """``error("<what> <path>: <cause>")`` with ``path``, ``cause`` and ``errno`` set."""
    os_errno = exc.errno if isinstance(exc, OSError) else None
    return error(
        f"{what} {path}: {describe_cause(exc)}",
        path=path,
        cause=cause_name(exc),
        os_errno=os_errno,
    )


def fsync_dir(directory: Path) -> None:
    """fsync a folder, so a rename or a new file in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, error: type[StorageError] | None = None) -> None:
    """Write to a temporary file, fsync it, rename it over ``path``, fsync the folder.

    Raises ``error`` (a :class:`~fedguard.core.errors.StorageError` sub-type;
    ``StorageError`` itself by default) naming ``path`` and the cause if any step
    fails; ``path`` then still holds its old content and no temporary file is left.
    """
    kind: type[StorageError] = StorageError if error is None else error
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise storage_error(kind, "cannot write", path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise storage_error(kind, "cannot write", path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        fsync_dir(path.parent)  # the rename itself must survive a power cut
    except OSError as exc:
        raise storage_error(kind, "cannot write (folder sync failed)", path, exc) from exc


def strict_json(value: Any) -> Any:
    """``value`` with NaN and ±Inf replaced by None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def atomic_write_json(path: Path, payload: Any, *, error: type[StorageError] | None = None) -> None:
    text = json.dumps(strict_json(payload), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, text.encode(), error=error)
