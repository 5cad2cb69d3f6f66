"""Background processes: spawning, PID files, folder locks, readiness and stopping.

Background processes are started in their own session with their output in a
log file; ``start`` returns once they are ready, ``stop`` ends them by PID.
One process per folder: ``start`` first takes an exclusive ``flock`` on the
folder's lock file and hands the locked descriptor to what it spawns, which
holds it for its life (:mod:`fedguard.core.process_lock`); ``stop`` stops the
processes that hold the lock, whatever the PID files say.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from fedguard.core.process_lock import FolderLockedError, ProcessLock, lock_holders
from fedguard.deploy.errors import AlreadyRunningError, DeploymentError

__all__ = [
    "READY_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "cmdline",
    "environment",
    "flower_tool",
    "lock_folder",
    "pid_alive",
    "read_pid",
    "reap",
    "spawn",
    "stop_holders",
    "stop_pid",
    "tail",
    "wait_for_port",
    "write_pid",
]

#: How long ``start`` waits for a process to be ready (``--timeout``'s default).
READY_TIMEOUT_S = 120.0
#: How long ``stop`` waits after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 15.0


def flower_tool(name: str) -> str:
    """A Flower executable from this interpreter's environment (or PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"cannot find Flower's `{name}`; is flwr installed here?")
    return found


def environment(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a Flower process whose ``FLWR_HOME`` is ``flwr_home``."""
    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def spawn(
    command: Sequence[str],
    log_file: Path,
    env: Mapping[str, str],
    cwd: Path,
    lock: ProcessLock | None = None,
) -> int:
    """Start ``command`` in its own session, output to ``log_file``; return its PID.

    With ``lock``, the child inherits the locked descriptor (same number): it holds
    the folder's lock until it exits (:mod:`fedguard.core.process_lock`).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n=== {datetime.now(UTC).isoformat()} {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            pass_fds=() if lock is None else (lock.fd,),
        )
    return process.pid


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count; another user's process does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def reap(pid: int) -> int | None:
    """Collect ``pid``'s exit status if it is our child; None otherwise."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done == pid else None


def cmdline(pid: int) -> str:
    """``pid``'s command line, its arguments joined by spaces ("" if it cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    """The PID a PID file names (None if it is absent or unreadable)."""
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def write_pid(path: Path, pid: int) -> None:
    path.write_text(f"{pid}\n")


def stop_pid(pid: int, expect: str, timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM ``pid`` (if its command line contains ``expect``), SIGKILL after ``timeout``."""
    if not pid_alive(pid) or expect not in cmdline(pid):
        reap(pid)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        reap(pid)
        time.sleep(0.05)
    return True


def lock_folder(lock_file: Path, what: str) -> ProcessLock:
    """Take the folder's lock before any check or spawn, or fail at once naming the holder."""
    try:
        return ProcessLock.acquire(lock_file, what)
    except FolderLockedError as busy:
        raise AlreadyRunningError(str(busy)) from None


#: One process of a folder, as :func:`stop_holders` finds it: its PID file, a marker of
#: its command line, and a marker of the folder on that command line (None: none needed).
Role = tuple[Path, str, str | None]


def _pids_to_stop(holders: Sequence[int], role: Role) -> list[int]:
    pid_file, expect, folder = role
    pids = [pid for pid in holders if expect in cmdline(pid)]
    recorded = read_pid(pid_file)
    if recorded is not None and recorded not in pids:
        line = cmdline(recorded)
        if expect in line and (folder is None or folder in line):
            pids.append(recorded)
    return pids


def _relock_and_clean(
    lock_file: Path, roles: Sequence[Role], what: str, stopped: Sequence[str]
) -> None:
    """Wait for the folder's lock, then remove its PID files under it."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while True:
        try:
            lock = ProcessLock.acquire(lock_file, what)
        except FolderLockedError as busy:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            left = ", ".join(f"PID {p} ({cmdline(p).strip()})" for p in lock_holders(lock_file))
            raise AlreadyRunningError(
                f"{busy}; still held after stopping {', '.join(stopped) or 'nothing'}"
                f"{f': {left}' if left else ''}"
            ) from None
        with lock:
            for pid_file, _, _ in roles:
                pid_file.unlink(missing_ok=True)
        return


def stop_holders(lock_file: Path, roles: Sequence[Role], what: str) -> list[str]:
    """Stop the folder's processes, then remove its PID files under its lock.

    ``roles``: ``(pid file, command-line marker, folder marker)`` in stopping order.
    Stopped are the processes that hold ``lock_file`` open and whose command line has
    the marker (the real holders, whatever the PID files say), and a PID file's
    process whose command line has both markers (one started without the lock).
    Raises :class:`AlreadyRunningError` if the lock is still held afterwards.
    """
    holders = lock_holders(lock_file)
    stopped: list[str] = []
    for role in roles:
        expect = role[1]
        stopped += [
            f"{expect} PID {pid}" for pid in _pids_to_stop(holders, role) if stop_pid(pid, expect)
        ]
    _relock_and_clean(lock_file, roles, what, stopped)
    return stopped


def tail(path: Path, lines: int = 5) -> str:
    """The last non-blank ``lines`` of a log file, on one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(line.strip() for line in kept)


def wait_for_port(host: str, port: int, pid: int, log_file: Path, timeout: float) -> None:
    """Wait until something listens on ``host:port``; raise if ``pid`` exits first."""
    deadline = time.monotonic() + timeout
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            code = reap(pid)
            raise DeploymentError(
                f"the process (PID {pid}) exited{f' with {code}' if code is not None else ''} "
                f"before it listened on {host}:{port}: {tail(log_file)}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((connect_host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {host}:{port} after {timeout:.0f} s (PID {pid})")
