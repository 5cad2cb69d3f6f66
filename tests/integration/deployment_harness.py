"""A real consortium on 127.0.0.1, driven through the ``fedguard`` commands.

Shared by tests/integration/test_deployment.py and the chaos harness
(tests/faults/chaos.py, benchmarks/chaos.py): one CA, one SuperLink (TLS, node
authentication) and SuperNodes with fedguard's warm ClientApp executor, each
started with the command docs/deployment.md gives (``python -m`` of the CLI
module, in a temporary folder). Every process started is stopped by its PID
(:func:`consortium_session`'s ``finally``): the PIDs in the PID files, their
descendants, and any process whose command line names the consortium's folder or
ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedguard.core.config import PrivacyBudget
from fedguard.deploy.layouts import ServerLayout

SILOS = ("hospital-a", "hospital-b", "hospital-c")


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


# -- processes -------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pids: set[int]) -> set[int]:
    tree = _children()
    found, todo = set(), list(pids)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pids: set[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_all(pids: set[int], markers: list[str]) -> None:
    """Stop ``pids``, their descendants and processes naming a marker: TERM, then KILL."""
    me = os.getpid()
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit() and int(pid_dir.name) != me:
            line = _cmdline(int(pid_dir.name))
            if any(m in line for m in markers):
                pids.add(int(pid_dir.name))
    everything = (pids | _descendants(pids)) - {me}
    _kill(everything, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in everything):
        time.sleep(0.2)
    _kill({p for p in everything if _alive(p)}, signal.SIGKILL)


def _pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def _read_pid(path: Path) -> int | None:
    try:
        return _pid(path)
    except (OSError, ValueError, IndexError):
        return None


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# -- the consortium --------------------------------------------------------------------------


@dataclass
class Consortium:
    root: Path
    address: str
    budget: PrivacyBudget
    started: set[int] = field(default_factory=set)
    markers: list[str] = field(default_factory=list)
    silo_ports: dict[str, int] = field(default_factory=dict)
    silos: dict[str, Path] = field(default_factory=dict)

    @property
    def server(self) -> ServerLayout:
        return ServerLayout(self.root / "server")

    def fedguard(self, *args: str, timeout: float = 300, check: bool = True) -> Any:
        done = subprocess.run(
            [*CLI, *args],
            cwd=self.root,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"fedguard {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def launch(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """Start ``fedguard ARGS`` without waiting (output to ``log``)."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [*CLI, *args],
                cwd=self.root,
                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started.add(process.pid)
        return process

    def remember(self, pid_file: Path) -> int:
        pid = _pid(pid_file)
        self.started.add(pid)
        return pid

    def start_server(self) -> int:
        self.fedguard("server", "start", "--server-dir", "server", "--address", self.address)
        return self.remember(self.server.pid_file)

    def start_silo(self, name: str, state: Path, activation_retry: float = 0) -> Any:
        done = self.fedguard(
            "client", "start",
            "--data", str(self.root / "data" / f"{name}.csv"),
            "--state-dir", str(state),
            "--superlink", self.address,
            "--ca-cert", "ca/ca.crt",
            "--key", f"keys/{name}/node.key",
            "--silo-id", name,
            "--dataset", "breast-cancer",
            "--target-epsilon", str(self.budget.epsilon),
            "--delta", str(self.budget.delta),
            "--runtime-port", str(self.silo_ports[name]),
            "--activation-retry", str(activation_retry),
            check=False,
        )  # fmt: skip
        for pid_file in (state / "supernode.pid", state / "executor.pid"):
            if pid_file.exists():
                self.remember(pid_file)
        return done

    def start_silos(self, states: dict[str, Path]) -> None:
        """Start the silos in parallel (each ``client start`` waits for its node ID)."""
        results: dict[str, Any] = {}

        def start(name: str) -> None:
            results[name] = self.start_silo(name, states[name])

        threads = [threading.Thread(target=start, args=(n,)) for n in states]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, done in results.items():
            assert done.returncode == 0, f"{name}: {done.stdout}\n{done.stderr}"

    def stop_silos(self, states: dict[str, Path]) -> None:
        """Stop the silos' processes by PID (TERM first: the SuperNode leaves the SuperLink,
        so a SuperNode with the same key may join again at once)."""
        pids = set()
        for state in states.values():
            for pid_file in (state / "supernode.pid", state / "executor.pid"):
                if pid_file.exists():
                    pids.add(_pid(pid_file))
        _stop_all(pids, [f"127.0.0.1:{self.silo_ports[n]}" for n in states])

    def fresh_silos(self, tag: str) -> dict[str, Path]:
        """Restart the silos on new state folders (``silos-TAG/NAME``): a new life, a new
        budget, and a ledger with nothing in it (cheap to account). Returns the folders.

        The silos are stopped by PID, TERM first: each SuperNode leaves the SuperLink,
        so the same key may join again at once. Nothing is restarted if none of the
        current folders was used by a run yet (no reply in its silo log).
        """
        if any(_replied(s) for s in self.silos.values()):
            self.stop_silos(self.silos)
            self.silos = {name: self.root / f"silos-{tag}" / name for name in self.silos}
            self.start_silos(self.silos)
        return dict(self.silos)


def _replied(state: Path) -> bool:
    """Whether a silo's state folder has sent anything (its silo log records a reply)."""
    log = state / "silo-log.jsonl"
    return log.exists() and '"kind":"sent"' in log.read_text(errors="replace")


@contextlib.contextmanager
def consortium_session(
    root: Path,
    budget: PrivacyBudget,
    silos: Sequence[str] = SILOS,
    spare_keys: Sequence[str] = (),
    states: dict[str, Path] | None = None,
) -> Iterator[Consortium]:
    """One CA, one SuperLink and ``silos`` started (warm executors), stopped on exit.

    ``spare_keys`` get a node key (and a port and a data file) but are neither
    registered nor started (the tests' unregistered ``rogue``). On exit every
    process is stopped and none may be left running.
    """
    names = [*silos, *spare_keys]
    root.mkdir(parents=True, exist_ok=True)
    link_port, *silo_ports = _free_ports(1 + len(names))
    c = Consortium(root, f"127.0.0.1:{link_port}", budget, markers=[str(root)])
    c.silo_ports = dict(zip(names, silo_ports, strict=True))
    c.markers += [f"127.0.0.1:{p}" for p in silo_ports]
    c.silos = dict(states) if states else {name: root / "silos" / name for name in silos}
    try:
        c.fedguard("ca", "init", "--dir", "ca")
        c.fedguard("ca", "issue-server", "--ca-dir", "ca", "--out", "server")
        for name in names:
            c.fedguard("node", "keygen", "--out", f"keys/{name}", "--name", name)
        # The CA signs the roster of the silos' SecAgg identity keys for the server.
        c.fedguard(
            "ca", "sign-roster", "--ca-dir", "ca", "--out", "server/secagg-roster.json",
            *[f"--silo={name}=keys/{name}/secagg-identity.pub" for name in silos],
        )  # fmt: skip
        write_silo_data(root / "data", names, len(silos))
        c.start_server()
        for name in silos:
            c.fedguard("node", "register", f"keys/{name}/node.pub", "--server-dir", "server")
        c.start_silos(c.silos)
        yield c
    finally:
        c.stop_silos(c.silos)
        _stop_all(c.started, c.markers)
    left = [p for p in c.started | _descendants(c.started) if _alive(p)]
    assert not left, f"processes left running: {[_cmdline(p) for p in left]}"


def write_silo_data(folder: Path, names: Sequence[str], shards: int) -> None:
    """Breast cancer records split ``shards`` ways (README step 2); extra names reuse a shard."""
    from sklearn.datasets import load_breast_cancer

    folder.mkdir(parents=True, exist_ok=True)
    frame = load_breast_cancer(as_frame=True).frame.sample(frac=1.0, random_state=0)
    for i, name in enumerate(names):
        frame.iloc[i % shards :: shards].to_csv(folder / f"{name}.csv", index=False)


def write_config(root: Path, name: str, rounds: int, extra: tuple[str, ...] = ()) -> Path:
    """A run config (``fedguard simulate``'s option names) for a small, quick DP run."""
    path = root / f"{name}.toml"
    path.write_text(
        "\n".join(
            [
                'dataset = "breast-cancer"',
                "clients = 3",
                f"rounds = {rounds}",
                "batch-size = 32",
                "learning-rate = 0.1",
                'hidden = "16"',
                f'run-name = "{name}"',
                *extra,
                "",
            ]
        )
    )
    return path


def history(consortium: Consortium, run: str) -> list[dict[str, Any]]:
    return json.loads((consortium.server.runs / run / "history.json").read_text())


def audit_records(consortium: Consortium, run: str) -> list[dict[str, Any]]:
    """The audit log's records of ``run`` (as parsed JSON lines)."""
    path = consortium.server.audit_log
    assert path.exists(), f"no audit log at {path}: the deployed ServerApp must write it"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["payload"].get("run_id") == run]


def verify_audit(consortium: Consortium, log: Path) -> Any:
    return consortium.fedguard(
        "audit", "verify", str(log), "--public-key", str(consortium.server.audit_public_key),
        check=False,
    )  # fmt: skip
