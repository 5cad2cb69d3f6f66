"""One long-lived process per folder: an exclusive ``flock`` held for the process's life.

``fedguard server start`` and ``fedguard client start`` each own a folder (the
server folder, a silo's state folder) and start one long-lived process from it
(``flower-superlink``; ``flower-supernode`` and, with ``--executor warm``, the
warm ClientApp executor). Two of them on one folder would share one SQLite
database, one ledger and one set of PID files. The start command therefore
takes an exclusive lock on a lock file in the folder *before* it checks or
spawns anything, hands the locked descriptor to the process it spawns
(``pass_fds``: the child inherits the same open file description, which is what
the lock belongs to), writes the PID files only while it holds the lock, and then
closes its own copy. From then on the lock lives exactly as long as the spawned
process (and the executor, which holds a copy too): the kernel drops it when the
last descriptor on the description is closed, that is when the last holder exits,
whether it exited cleanly, was killed with SIGKILL or the machine rebooted.

Why ``flock`` and not a PID check. A PID file is read, checked, then the process
is spawned and the file written: two starts launched together both read "nothing
runs", both spawn, and the PID file names whichever wrote last (issue 13, item 6).
A PID can also be stale (its process died without removing the file) or reused
by an unrelated process. ``flock(LOCK_EX | LOCK_NB)`` is one atomic kernel
operation: exactly one caller gets the lock, the others fail at once
(:class:`FolderLockedError`, naming the folder and the holder's PID, which the
holder writes into the lock file), and there is nothing stale to clean up, since a
dead process holds no lock. The lock file itself is never deleted: removing it
while a process holds it would let the next start lock a new file of the same
name beside a running process.

Limits.

* Local file systems only. ``flock`` on NFS is emulated with byte-range
  (``fcntl``) locks by Linux clients since 2.6.12, but whether it excludes a
  process on *another* client depends on the server and mount options
  (``nolock``, ``local_lock=``) and a lock can be lost when the server
  restarts; on other network file systems (SMB, FUSE, some container volumes)
  it may be local to one machine or not work at all. Keep server and state
  folders on a local disk.
* Advisory: it excludes only processes that take the same lock (every
  ``fedguard ... start`` does); a hand-started ``flower-superlink`` on the same
  folder is not stopped by it.
* Never ``LOCK_UN``: unlocking the shared description would unlock the spawned
  process as well; :meth:`ProcessLock.close` only closes this process's copy.
* The lock follows the descriptor into ``fork`` children (a forked child keeps
  the lock alive until it exits too); ``subprocess`` children do not get it
  unless it is passed to them, since Python opens it close-on-exec.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from fedguard.core.errors import FedguardError

__all__ = [
    "FolderLockedError",
    "ProcessLock",
    "lock_holder",
    "lock_holders",
    "lock_is_held",
    "wait_released",
]

#: How long a loser waits for the winner to write its PID into the lock file.
_HOLDER_WAIT_S = 0.5


class FolderLockedError(FedguardError):
    """Another process holds the folder's lock (``holder``: its PID, None if unknown)."""

    def __init__(self, folder: Path, lock_file: Path, holder: int | None, what: str) -> None:
        who = f"PID {holder}" if holder is not None else "a process whose PID is not recorded"
        super().__init__(
            f"{what} already runs from {folder} ({who} holds the lock {lock_file}); "
            "stop it first, or use another folder"
        )
        self.folder = folder
        self.lock_file = lock_file
        self.holder = holder


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def lock_holder(path: Path) -> int | None:
    """The PID the lock file ``path`` names (meaningful while the lock is held)."""
    return _read_pid(path)


def lock_holders(path: Path) -> list[int]:
    """PIDs of the processes that have ``path`` open (Linux ``/proc``), this one excluded.

    Every process that holds the lock has a descriptor on the file (the spawned
    SuperLink, SuperNode, executor), so this finds the real holders even when a
    PID file is missing or names another process. Processes this user may not
    inspect are not listed.
    """
    try:
        target = os.stat(path)
    except OSError:
        return []
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                opened = os.stat(entry / "fd" / fd)  # follows the link to the open file
            except OSError:
                continue
            if (opened.st_dev, opened.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(entry.name))
                break
    return sorted(found)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_is_held(path: Path) -> bool:
    """True while some process holds the lock on ``path`` (probes it; never blocks).

    The probe takes the lock for an instant when it is free, so a start launched at
    that very instant fails as if the folder were busy; call it only to check that
    a stopped process is gone.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)  # releases the probe's lock (only this descriptor had it)


def wait_released(path: Path, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the lock on ``path`` to be free; True once it is."""
    deadline = time.monotonic() + timeout
    while lock_is_held(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class ProcessLock:
    """An exclusive ``flock`` on ``path``, taken with :meth:`acquire`.

    ``fd`` is the locked descriptor: pass it to a child (``pass_fds=[lock.fd]``, or
    :meth:`inheritable` before ``exec``) to make the child hold the lock for its life.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path: Path, what: str) -> ProcessLock:
        """Lock ``path`` (created if needed) or raise :class:`FolderLockedError` at once.

        ``what`` names the process in the error ("a SuperLink"). The new holder's PID
        (this process, until :meth:`record` names another) is written into the file.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise FedguardError(f"cannot open the lock file {path}: {error}") from None
        try:
            locked = _try_lock(fd)
        except OSError as error:  # ENOLCK: no lock support (some network file systems)
            os.close(fd)
            raise FedguardError(
                f"cannot lock {path} ({error}); keep the folder on a local file system"
            ) from None
        if not locked:
            os.close(fd)
            raise FolderLockedError(path.parent, path, cls._holder_of(path), what)
        lock = cls(path, fd)
        lock.record(os.getpid())
        return lock

    @staticmethod
    def _holder_of(path: Path) -> int | None:
        # The winner writes its PID right after it locks; give it that instant.
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while (pid := lock_holder(path)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return pid

    def record(self, pid: int) -> None:
        """Write ``pid`` into the lock file as its holder (what a second start reports)."""
        data = f"{pid}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def inheritable(self) -> int:
        """Make ``fd`` survive ``exec`` (for ``os.execve``); return it."""
        os.set_inheritable(self.fd, True)
        return self.fd

    def close(self) -> None:
        """Close this process's copy; the lock stays while a child still holds one."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
