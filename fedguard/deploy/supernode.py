"""``fedguard client start|stop``: a silo's SuperNode (``flower-supernode``) and its executor.

``client start`` checks the silo's ledger against its signed log, and that it can
write it (:func:`fedguard.client.ledger_guard.verify_silo_state`), before it
spawns or connects anything.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedguard.core.config import DatasetName, PrivacyBudget
from fedguard.core.errors import ConfigError, FedguardError
from fedguard.core.process_lock import ProcessLock
from fedguard.deploy.bundles import node_config_toml
from fedguard.deploy.errors import DeploymentError
from fedguard.deploy.layouts import SiloLayout, parse_address
from fedguard.deploy.supervision import (
    environment,
    flower_tool,
    lock_folder,
    pid_alive,
    reap,
    spawn,
    stop_holders,
    stop_pid,
    tail,
    write_pid,
)

__all__ = [
    "DEFAULT_RUNTIME_PORT",
    "ActivationRefusedError",
    "ClientStart",
    "ExecutorMode",
    "SiloStateError",
    "start_client",
    "stop_client",
    "supernode_command",
]

DEFAULT_RUNTIME_PORT = 9094
#: The warm executor's module (``python -m``), also its command-line marker.
_EXECUTOR = "fedguard.client.executor"


class ExecutorMode:
    """How a SuperNode runs ClientApps (``--executor``)."""

    WARM = "warm"  # --isolation process + fedguard.client.executor (pre-imported, forked)
    FLOWER = "flower"  # Flower's default: a new flwr-clientapp process per message
    CHOICES = (WARM, FLOWER)


class SiloStateError(DeploymentError):
    """``client start`` refused: the silo's ledger or log failed its check; nothing started."""


class ActivationRefusedError(DeploymentError):
    """The SuperLink refused to activate the node (Flower exit code 305)."""


_REFUSED_HINT = (
    "exit 305: the SuperLink refused to activate this node. Either its public key is not "
    "registered (`fedguard node register KEY.pub` on the server), or a SuperNode with this "
    "key is still marked online (one that died less than about a minute ago: Flower marks "
    "a node offline after two missed 30 s heartbeats)"
)


@dataclass(frozen=True)
class ClientStart:
    """What ``fedguard client start`` starts a silo with (its options)."""

    state_dir: Path
    data: Path
    superlink: str
    ca_cert: Path
    key: Path
    dataset: str
    target_epsilon: float
    delta: float
    runtime_port: int
    executor: str
    activation_retry: float
    timeout: float
    foreground: bool = False
    silo_id: str | None = None
    secagg_identity: str | None = None
    consortium_key: str | None = None
    # The silo's own copy of the consortium's data contract (instead of ``dataset``).
    contract: str | None = None
    # The consortium's own model, from this silo's installation (package.module:function).
    model_factory: str | None = None


def supernode_command(
    superlink: str,
    ca_cert: Path,
    key: Path,
    node_config: Path,
    runtime_port: int,
    executor: str,
) -> list[str]:
    """``flower-supernode`` with the CA, the node key and the silo's node config."""
    command = [
        flower_tool("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_cert.resolve()),
        "--auth-supernode-private-key",
        str(key.resolve()),
        "--node-config",
        str(node_config.resolve()),
        "--port",
        str(runtime_port),
    ]
    if executor == ExecutorMode.WARM:
        command += ["--isolation", "process"]
    return command


def _wait_for_supernode(pid: int, log_file: Path, offset: int, timeout: float) -> str:
    """Wait until the SuperNode says its node ID; raise if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(log_file, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            text = ""
        if "SuperNode ID:" in text:
            return text.split("SuperNode ID:", 1)[1].split()[0]
        if not pid_alive(pid):
            code = reap(pid)
            if "Exit Code: 305" in text:
                raise ActivationRefusedError(f"the SuperNode (PID {pid}) exited ({_REFUSED_HINT})")
            raise DeploymentError(
                f"the SuperNode (PID {pid}) exited"
                f"{f' with {code}' if code is not None else ''}: {tail(log_file)}"
            )
        time.sleep(0.2)
    raise DeploymentError(f"the SuperNode (PID {pid}) did not connect in {timeout:.0f} s")


def _start_supernode(
    command: Sequence[str],
    layout: SiloLayout,
    env: Mapping[str, str],
    start: ClientStart,
    lock: ProcessLock,
) -> tuple[int, str]:
    """Start the SuperNode; while activation is refused, retry for ``--activation-retry`` s.

    Runs while this process holds the silo's ``lock``; each SuperNode inherits it.
    """
    retry_until = time.monotonic() + start.activation_retry
    while True:
        offset = layout.supernode_log.stat().st_size if layout.supernode_log.exists() else 0
        pid = spawn(command, layout.supernode_log, env, layout.root, lock)
        lock.record(pid)
        write_pid(layout.supernode_pid, pid)
        try:
            return pid, _wait_for_supernode(pid, layout.supernode_log, offset, start.timeout)
        except ActivationRefusedError:
            layout.supernode_pid.unlink(missing_ok=True)
            lock.record(os.getpid())
            if time.monotonic() >= retry_until:
                raise
            print("activation refused; retrying in 5 s (see --activation-retry)", flush=True)
            time.sleep(5.0)
        except BaseException:
            stop_pid(pid, "flower-supernode", timeout=5.0)
            layout.supernode_pid.unlink(missing_ok=True)
            lock.record(os.getpid())
            raise


def _check_silo_state(node_config: str, layout: SiloLayout) -> float:
    """Run the silo's ledger checks on the settings ``node_config`` gives the SuperNode.

    The same :func:`~fedguard.client.ledger_guard.verify_silo_state` a training
    message runs (the ledger against the signed silo log, and writable), before
    anything is spawned or connected. Returns the silo's lifetime ε.
    """
    import sqlite3

    from fedguard.client.ledger_guard import verify_silo_state
    from fedguard.client.silo import settings_from_node_config

    settings = settings_from_node_config(tomllib.loads(node_config))
    try:
        return verify_silo_state(settings)
    except (FedguardError, OSError, sqlite3.Error) as error:
        raise SiloStateError(
            f"silo {settings.silo_id}: its state in {layout.root} failed the start check, so "
            f"no SuperNode was started: {type(error).__name__}: {error}"
        ) from error


def _check_silo_data(node_config: str, layout: SiloLayout) -> str:
    """Validate the silo's table against its contract before anything is spawned.

    The same :func:`~fedguard.client.silo.load_silo_data` every message runs: the
    report goes to the state folder; a table that breaks the contract stops the
    start with its summary (nothing connected, nothing charged).
    """
    from fedguard.client.silo import VALIDATION_REPORT, load_silo_data, settings_from_node_config

    settings = settings_from_node_config(tomllib.loads(node_config))
    try:
        data = load_silo_data(settings)
    except FedguardError as error:
        raise SiloStateError(
            f"silo {settings.silo_id}: its data failed the start check, so no SuperNode was "
            f"started (report: {layout.root / VALIDATION_REPORT}): {error}"
        ) from error
    contract = settings.data.contract
    rows = len(data.train) + len(data.test)
    return (
        f"{rows} rows meet data contract {contract.name!r} v{contract.version} "
        f"({contract.content_hash()[:12]})"
    )


def _checked_data(start: ClientStart) -> Path:
    """The silo's data file, once every input of ``client start`` is checked."""
    data = start.data.resolve()
    if not data.is_file():
        raise DeploymentError(f"silo data file {data} does not exist")
    for path, what in ((start.ca_cert, "CA certificate"), (start.key, "node key")):
        if not path.is_file():
            raise DeploymentError(f"{what} {path} does not exist")
    parse_address(start.superlink)
    if start.activation_retry < 0:
        raise ConfigError(f"--activation-retry must be >= 0, got {start.activation_retry}")
    return data


def _node_config(
    start: ClientStart, layout: SiloLayout, data: Path, budget: PrivacyBudget, silo_id: str
) -> str:
    from fedguard.deploy.roster import silo_identity_paths

    identity = silo_identity_paths(
        start.secagg_identity, start.key, start.consortium_key, start.ca_cert
    )
    return node_config_toml(
        silo_id,
        Path(start.contract).resolve() if start.contract else DatasetName.parse(start.dataset),
        data,
        layout.root,
        budget,
        signing_key=start.key.resolve(),
        secagg_identity=identity[0] if identity else None,
        consortium_key=identity[1] if identity else None,
        model_factory=start.model_factory,
    )


def _start_executor(
    start: ClientStart, layout: SiloLayout, env: Mapping[str, str], lock: ProcessLock, pid: int
) -> int:
    """Start the warm ClientApp executor beside SuperNode ``pid``; stop that on a failure."""
    executor = [
        sys.executable,
        "-m",
        _EXECUTOR,
        "--runtime-api-address",
        f"127.0.0.1:{start.runtime_port}",
        "--parent-pid",
        str(pid),
    ]
    try:
        executor_pid = spawn(executor, layout.executor_log, env, layout.root, lock)
    except BaseException:
        stop_pid(pid, "flower-supernode", timeout=5.0)
        layout.supernode_pid.unlink(missing_ok=True)
        raise
    write_pid(layout.executor_pid, executor_pid)
    return executor_pid


def start_client(start: ClientStart) -> int:
    """``fedguard client start``: check the silo, start its SuperNode (and executor)."""
    layout = SiloLayout(start.state_dir.resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    # The lock first: a second start on this folder fails here, before any check or write.
    with lock_folder(layout.lock_file, "a SuperNode") as lock:
        data = _checked_data(start)
        budget = PrivacyBudget(start.target_epsilon, start.delta)
        silo_id = start.silo_id or layout.root.name
        node_config = _node_config(start, layout, data, budget, silo_id)
        spent = _check_silo_state(node_config, layout)
        validated = _check_silo_data(node_config, layout)
        layout.node_config.write_text(node_config)
        command = supernode_command(
            start.superlink,
            start.ca_cert,
            start.key,
            layout.node_config,
            start.runtime_port,
            start.executor,
        )
        env = environment(layout.flwr_home)
        pid, node_id = _start_supernode(command, layout, env, start, lock)
        executor_pid = None
        if start.executor == ExecutorMode.WARM:
            executor_pid = _start_executor(start, layout, env, lock, pid)
        print(
            f"silo {silo_id}: SuperNode PID {pid}, node ID {node_id}, connected to "
            f"{start.superlink}"
        )
        if executor_pid is not None:
            print(f"  warm ClientApp executor PID {executor_pid}")
        print(f"  ledger: ε {spent:.6g} of {budget.epsilon:g} spent (checked against the silo log)")
        print(f"  data: {validated}")
        print(f"  log: {layout.supernode_log}")
        if start.foreground:
            return _wait_foreground(pid, executor_pid)
    return 0


def _wait_foreground(pid: int, executor_pid: int | None) -> int:
    def forward(signum: int, _frame: object) -> None:
        os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = None
    while code is None and pid_alive(pid):
        code = reap(pid)
        time.sleep(0.5)
    if code is None:
        code = reap(pid)
    if executor_pid is not None:
        stop_pid(executor_pid, _EXECUTOR, timeout=5.0)
    return code or 0


def stop_client(state_dir: Path) -> int:
    """``fedguard client stop``: stop the SuperNode and executor holding the silo's lock."""
    layout = SiloLayout(state_dir.resolve())
    if not layout.root.is_dir():
        print(f"nothing running for {layout.root}")
        return 0
    stopped = stop_holders(
        layout.lock_file,
        [
            (layout.supernode_pid, "flower-supernode", str(layout.node_config.resolve())),
            (layout.executor_pid, _EXECUTOR, None),
        ],
        "a SuperNode",
    )
    print("stopped " + ", ".join(stopped) if stopped else f"nothing running for {layout.root}")
    return 0
