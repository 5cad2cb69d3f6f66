"""Issue 13, item 6: two starts on one folder can never both succeed.

Real processes and real files: a consortium CA and SuperLink on 127.0.0.1 (as in
tests/integration/test_deployment.py), ``fedguard server start`` and ``fedguard
client start`` launched twice at the same moment on one folder. Exactly one wins;
the other fails at once naming the folder and the holder's PID, and touches no PID
file; ``stop`` stops the real process and frees the lock, so a new start works.

The module's :func:`deployment` helper (a CA, server folders, node keys, one
running SuperLink with the keys registered) is shared with
tests/faults/test_client_start_checks.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedguard.audit.pki import init_ca, issue_server_cert, node_keygen
from fedguard.core.builtin_datasets import load_pooled_frame
from fedguard.core.config import DatasetName

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

# -- small process helpers (as in tests/integration/test_deployment.py, copied so that
# this module does not depend on that one's layout) ----------------------------------------


CLI = [sys.executable, "-m", "fedguard.cli"]


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _descendants(pids: set[int]) -> set[int]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(pids)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _processes_naming(*needles: str) -> list[int]:
    """Live processes (not this one) whose command line holds every needle."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            line = _cmdline(int(entry.name))
            if all(n in line for n in needles) and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _stop_all(markers: Sequence[str]) -> None:
    """Stop every process naming a marker, and its descendants: TERM, then KILL."""
    roots = {pid for marker in markers for pid in _processes_naming(marker)}
    everything = (roots | _descendants(roots)) - {os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in everything:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in everything):
            time.sleep(0.1)


START_TIMEOUT_S = 90  # what `start --timeout` waits; a test here takes seconds

#: Run by each of the processes :meth:`Deployment.launch_together` starts at one instant.
_BARRIER = """
import importlib, os, sys
for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
main = importlib.import_module(sys.argv[2]).main
ready, go = int(os.environ.pop("FG_READY_FD")), int(os.environ.pop("FG_GO_FD"))
os.write(ready, b"r")
os.close(ready)
os.read(go, 1)
os.close(go)
sys.exit(main(sys.argv[3:]))
"""
#: Imported before the barrier, so that after it the starts race on the folder only.
_PRELOAD = (
    "fedguard.cli.simulate",
    "fedguard.cli.edge",
    "fedguard.cli.explain",
    "fedguard.cli.monitor",
    "fedguard.cli.deploy",
    "fedguard.deploy.superlink",
    "fedguard.deploy.supernode",
    "fedguard.deploy.roster",
    "fedguard.client.silo",
    "fedguard.client.ledger_guard",
)


@dataclass
class Deployment:
    """A CA, node keys and one running SuperLink (``server/``) under ``root``."""

    root: Path
    address: str
    runtime_ports: list[int]
    markers: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}

    def launch_together(self, *commands: Sequence[str]) -> list[subprocess.Popen[str]]:
        """Start one ``fedguard`` per command, all released at the same instant.

        Each process imports the CLI (and what the commands import) first, says it
        is ready on a pipe, then blocks reading a second pipe; one write releases them
        all, so their starts meet at the folder within a millisecond or so, not
        seconds of import time apart.
        """
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        env = {**self.env(), "FG_READY_FD": str(ready_w), "FG_GO_FD": str(go_r)}
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _BARRIER, ",".join(_PRELOAD), "fedguard.cli", *command],
                cwd=self.root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=(ready_w, go_r),
            )
            for command in commands
        ]
        os.close(ready_w)
        os.close(go_r)
        try:
            ready = b""
            while len(ready) < len(processes):
                readable, _, _ = select.select([ready_r], [], [], START_TIMEOUT_S)
                chunk = os.read(ready_r, 16) if readable else b""
                if not chunk:
                    break  # one exited before it was ready (or timed out): its output says why
                ready += chunk
            os.write(go_w, b"g" * len(processes))
        finally:
            os.close(ready_r)
            os.close(go_w)
        return processes

    def fedguard(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*CLI, *args],
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"fedguard {' '.join(args)}: {done.stdout}\n{done.stderr}")
        return done

    def client_start_args(self, key: str, state: Path, port: int, *extra: str) -> list[str]:
        return [
            "client", "start",
            "--data", str(self.root / "data.csv"),
            "--state-dir", str(state),
            "--superlink", self.address,
            "--ca-cert", "ca/ca.crt",
            "--key", f"keys/{key}/node.key",
            "--dataset", "breast-cancer",
            "--target-epsilon", "3.0",
            "--delta", "1e-5",
            "--runtime-port", str(port),
            "--activation-retry", "0",
            "--timeout", str(START_TIMEOUT_S),
            *extra,
        ]  # fmt: skip


@contextlib.contextmanager
def deployment(
    root: Path, keys: Sequence[str], server_folders: Sequence[str] = ()
) -> Iterator[Deployment]:
    """Make the CA, ``server/`` (running) and ``server_folders`` (not), register ``keys``."""
    link_port, *runtime_ports = _free_ports(1 + len(keys))
    d = Deployment(root, f"127.0.0.1:{link_port}", runtime_ports, markers=[str(root)])
    d.markers += [f"127.0.0.1:{p} " for p in runtime_ports]  # the warm executors
    init_ca(root / "ca")
    for folder in ("server", *server_folders):
        issue_server_cert(root / "ca", root / folder)
    for key in keys:
        node_keygen(root / "keys" / key, comment=key, secagg_identity=True)
    # `client start` validates the silo's table against its contract before it connects.
    load_pooled_frame(DatasetName.BREAST_CANCER).head(60).to_csv(root / "data.csv", index=False)
    try:
        d.fedguard("server", "start", "--server-dir", "server", "--address", d.address)
        for key in keys:
            d.fedguard("node", "register", f"keys/{key}/node.pub", "--server-dir", "server")
        yield d
    finally:
        _stop_all(d.markers)
    left = [p for marker in d.markers for p in _processes_naming(marker)]
    assert not left, f"processes left running: {[_cmdline(p) for p in left]}"


def lock_is_free(path: Path) -> bool:
    """Probe the folder's lock file with flock, as a new start would."""
    with open(path, "rb") as probe:
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _number(pattern: str, text: str) -> int:
    """The number ``pattern``'s group captures in ``text``."""
    found = re.search(pattern, text)
    assert found is not None, f"{pattern!r} not in {text!r}"
    return int(found.group(1))


def _holder_named(error: str) -> int:
    """The holder's PID in a refused start's error."""
    return _number(r"\(PID (\d+) holds the lock", error)


def _pid_in(path: Path) -> int:
    return int(path.read_text().split()[0])


def _both(
    first: subprocess.Popen[str], second: subprocess.Popen[str]
) -> list[tuple[int, str, str]]:
    results = []
    for process in (first, second):
        out, err = process.communicate(timeout=START_TIMEOUT_S + 30)
        results.append((process.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("locks"), ["silo-a"], ["server-race"]) as d:
        yield d


@pytest.mark.timeout(240)
def test_two_server_starts_on_one_folder_one_wins_and_stop_stops_it(site: Deployment) -> None:
    folder = site.root / "server-race"
    (port,) = _free_ports(1)
    start = ("server", "start", "--server-dir", "server-race", "--address", f"127.0.0.1:{port}")
    start_timeout = ("--timeout", str(START_TIMEOUT_S))
    first, second = site.launch_together([*start, *start_timeout], [*start, *start_timeout])
    results = _both(first, second)
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1 and len(losers) == 1, f"both starts: {results}"
    winner_pid = _number(r"SuperLink PID (\d+)", winners[0][1])
    error = losers[0][2]
    assert f"already runs from {folder}" in error, error
    # The holder when the loser looked: the winning start, or the SuperLink it spawned.
    assert _holder_named(error) in {first.pid, second.pid, winner_pid}, error
    # The loser touched no PID file: the PID file and the lock name the real SuperLink,
    # and it is the only one running from the folder.
    database = str(folder / "superlink.db")
    assert _pid_in(folder / "superlink.pid") == winner_pid
    assert _pid_in(folder / "superlink.lock") == winner_pid
    assert _processes_naming("flower-superlink", database) == [winner_pid]
    assert not lock_is_free(folder / "superlink.lock")

    stop = site.fedguard("server", "stop", "--server-dir", "server-race")
    assert f"stopped SuperLink PID {winner_pid}" in stop.stdout, stop.stdout
    assert _processes_naming("flower-superlink", database) == []
    assert lock_is_free(folder / "superlink.lock")
    assert not (folder / "superlink.pid").exists()

    # The lock died with the process: a new start works, and stops.
    again = site.fedguard(*start, *start_timeout)
    new_pid = _number(r"SuperLink PID (\d+)", again.stdout)
    assert _processes_naming("flower-superlink", database) == [new_pid]
    site.fedguard("server", "stop", "--server-dir", "server-race")
    assert _processes_naming("flower-superlink", database) == []


@pytest.mark.timeout(240)
def test_two_client_starts_on_one_state_folder_one_wins(site: Deployment) -> None:
    state = site.root / "silos" / "silo-a"
    args = site.client_start_args("silo-a", state, site.runtime_ports[0])
    first, second = site.launch_together(args, args)
    starters = {first.pid, second.pid}
    try:
        results = _both(first, second)
        winners = [r for r in results if r[0] == 0]
        losers = [r for r in results if r[0] != 0]
        assert len(winners) == 1 and len(losers) == 1, f"both starts: {results}"
        out = winners[0][1]
        supernode = _number(r"SuperNode PID (\d+)", out)
        executor = _number(r"executor PID (\d+)", out)
        error = losers[0][2]
        assert f"already runs from {state}" in error, error
        # The holder when the loser looked: the winning start, or the SuperNode it spawned.
        assert _holder_named(error) in starters | {supernode}, (error, starters, supernode)
        # One SuperNode for the folder; the PID files and the lock name it and its executor.
        assert _processes_naming("flower-supernode", str(state / "node-config.toml")) == [supernode]
        assert _pid_in(state / "supernode.pid") == supernode
        assert _pid_in(state / "executor.pid") == executor
        assert _pid_in(state / "silo.lock") == supernode
        assert not lock_is_free(state / "silo.lock")
    finally:
        stop = site.fedguard("client", "stop", "--state-dir", str(state), check=False)
    assert stop.returncode == 0, stop.stderr
    assert _processes_naming("flower-supernode", str(state / "node-config.toml")) == []
    assert (
        _processes_naming("fedguard.client.executor", f"127.0.0.1:{site.runtime_ports[0]} ") == []
    )
    assert not [p for p in _descendants(starters) if _alive(p)]
    assert lock_is_free(state / "silo.lock")
    assert not (state / "supernode.pid").exists() and not (state / "executor.pid").exists()
