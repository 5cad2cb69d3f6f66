"""``fedguard`` deployment commands: a thin, documented layer over Flower's own.

Every command says which Flower command it runs; nothing here speaks a
transport of its own. The walkthrough in ``docs/deployment.md`` runs them in
order.

=============================  ==============================================================
``fedguard ca init``           make the consortium CA (``cryptography``; :mod:`fedguard.core.pki`)
``fedguard ca issue-server``   the SuperLink's TLS certificate and Ed25519 audit key
``fedguard ca sign-roster``    the signed SecAgg roster of the silos' identity keys
                               (:mod:`fedguard.server.roster_commands`)
``fedguard node keygen``       a silo's SuperNode authentication key (ECDSA P-384, OpenSSH)
                               and its SecAgg identity key (Ed25519)
``fedguard node register``     ``flwr supernode register KEY.pub fedguard``
``fedguard node list``         ``flwr supernode list fedguard``
``fedguard server start``      ``flower-superlink`` with TLS, node authentication,
                               ``--disable-runtime-dependency-installation``, ``--database``
``fedguard server stop``       SIGTERM to the PID in ``superlink.pid``
``fedguard client start``      ``flower-supernode`` with the CA, the node key and
                               ``--node-config`` (+ fedguard's warm ClientApp executor)
``fedguard client stop``       SIGTERM to the PIDs in the state folder
``fedguard run CONFIG``        ``flwr run APP fedguard`` with a generated app (the
                               fedguard Server/ClientApps, ``CONFIG``'s options as run config)
``fedguard audit verify``      :func:`fedguard.server.audit.verify_audit_log`
``fedguard models ...``        :class:`fedguard.server.registry.ModelRegistry`
=============================  ==============================================================

Folders. The server keeps everything in one folder (``--server-dir``, see
:class:`ServerLayout`): its certificate and keys, the SuperLink's database, PID
and log, the Flower CLI's configuration (``flwr-home/config.toml``, with one
SuperLink connection named ``fedguard``), the run folders, the audit log and the
model registry. The SuperLink is started with ``FEDGUARD_SERVER_DIR`` in its
environment, which every ServerApp it starts inherits: that is how the deployed
ServerApp finds the audit key and the registry (:meth:`ServerLayout.from_env`);
key material never travels in a run's config. A silo keeps everything in its
state folder (``--state-dir``, see :class:`SiloLayout`): the privacy ledger,
its log of what it sent, its node config, PIDs and logs.

Background processes are started in their own session with their output in a
log file; ``start`` returns once they are ready, ``stop`` ends them by PID.
One process per folder: ``start`` first takes an exclusive ``flock`` on
``superlink.lock`` (server folder) or ``silo.lock`` (state folder) and hands the
locked descriptor to the SuperLink, or to the SuperNode and its executor, which
hold it for their life (:mod:`fedguard.core.process_lock`); a second ``start``
on the folder fails at once naming the holder's PID, and ``stop`` stops the
processes that hold the lock, whatever the PID files say. ``client start``
checks the silo's ledger against its signed log, and that it can write it
(:func:`fedguard.client.ledger_guard.verify_silo_state`), before it spawns or
connects anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedguard.core.config import DatasetName, PrivacyBudget, RunConfig
from fedguard.core.errors import ConfigError, FedguardError
from fedguard.core.process_lock import (
    FolderLockedError,
    ProcessLock,
    lock_holder,
    lock_holders,
    lock_is_held,
)

__all__ = [
    "CONNECTION",
    "RUN_LOCK",
    "SERVER_DIR_ENV",
    "ActivationRefusedError",
    "AlreadyRunningError",
    "DeploymentError",
    "DeploymentRecorder",
    "ExecutorMode",
    "RunActiveError",
    "ServerLayout",
    "SiloLayout",
    "SuperLinkUnreachableError",
    "add_deploy_commands",
    "hold_run_lock",
    "main",
    "node_config_toml",
    "stop_unfinished_attempts",
    "write_app",
]

#: Name of the SuperLink connection in ``<server-dir>/flwr-home/config.toml``.
CONNECTION = "fedguard"
#: Environment variable that tells a deployed ServerApp where its server folder is.
SERVER_DIR_ENV = "FEDGUARD_SERVER_DIR"
DEFAULT_SERVER_ADDRESS = "127.0.0.1:9092"
DEFAULT_RUNTIME_PORT = 9094
SERVERAPP_REF = "fedguard.server.app:app"
CLIENTAPP_REF = "fedguard.client.app:app"
_READY_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 15.0


class DeploymentError(FedguardError):
    """A deployment command failed (a process did not start, a Flower command failed)."""


class AlreadyRunningError(DeploymentError):
    """Another process holds the folder's lock (a second ``start`` on one folder)."""


class SuperLinkUnreachableError(DeploymentError):
    """The SuperLink's Control API cannot be reached (not running, wrong address, down)."""


class RunActiveError(AlreadyRunningError):
    """A ServerApp already runs this run (it holds the run folder's lock)."""


#: In each run folder: locked by the ServerApp running the run, for its life. Flower
#: launches again a ServerApp whose task token expired (one killed while starting, or
#: one whose SuperLink was killed: ``flwr/supercore/corestate/sql_corestate.py``,
#: ``_cleanup_expired_task_tokens``) beside the attempt ``fedguard run`` started
#: afresh; two would write one run's checkpoints and audit records at once.
RUN_LOCK = "serverapp.lock"


def hold_run_lock(run_dir: Path, run_id: str, flower_run: object) -> ProcessLock:
    """The run folder's lock for this ServerApp's life, or :class:`RunActiveError`.

    Taken before anything is read or written (before ``run-start``): a second
    ServerApp for one run stops here, and the one already running goes on alone.
    """
    try:
        return ProcessLock.acquire(run_dir / RUN_LOCK, f"a ServerApp of run {run_id}")
    except FolderLockedError as busy:
        raise RunActiveError(
            f"{busy}; this ServerApp (Flower run {flower_run}) stops without starting"
        ) from None


class SiloStateError(DeploymentError):
    """``client start`` refused: the silo's ledger or log failed its check; nothing started."""


class ExecutorMode:
    """How a SuperNode runs ClientApps (``--executor``)."""

    WARM = "warm"  # --isolation process + fedguard.client.executor (pre-imported, forked)
    FLOWER = "flower"  # Flower's default: a new flwr-clientapp process per message
    CHOICES = (WARM, FLOWER)


# -- folders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLayout:
    """Where the consortium server keeps everything (``--server-dir``)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def key(self) -> Path:
        return self.root / "server.key"

    @property
    def audit_key(self) -> Path:
        return self.root / "audit.key"

    @property
    def audit_public_key(self) -> Path:
        return self.root / "audit.pub"

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def pid_file(self) -> Path:
        return self.root / "superlink.pid"

    @property
    def lock_file(self) -> Path:
        """Locked by the SuperLink for its life (:mod:`fedguard.core.process_lock`)."""
        return self.root / "superlink.lock"

    @property
    def log_file(self) -> Path:
        return self.root / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def apps(self) -> Path:
        return self.root / "apps"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerLayout | None:
        """The layout a deployed ServerApp runs under, or None outside a fedguard SuperLink."""
        value = (os.environ if environ is None else environ).get(SERVER_DIR_ENV)
        return cls(Path(value)) if value else None

    def open_audit_log(self) -> Any:
        """The server's :class:`~fedguard.server.audit.AuditLog`, signed with ``audit.key``."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from fedguard.core.pki import load_private_key
        from fedguard.server.audit import AuditLog

        key = load_private_key(self.audit_key)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DeploymentError(f"{self.audit_key} is not an Ed25519 key")
        return AuditLog.open(self.audit_log, key)

    def open_registry(self) -> Any:
        """The server's :class:`~fedguard.server.registry.ModelRegistry`."""
        from fedguard.server.registry import ModelRegistry

        return ModelRegistry.open(self.registry)

    def load_roster(self) -> Any:
        """The signed SecAgg roster (``secagg-roster.json``), or None if there is none."""
        from fedguard.server.roster_commands import load_server_roster

        return load_server_roster(self.root)


@dataclass(frozen=True)
class SiloLayout:
    """Where a silo keeps everything (``--state-dir``)."""

    root: Path

    @property
    def node_config(self) -> Path:
        return self.root / "node-config.toml"

    @property
    def supernode_pid(self) -> Path:
        return self.root / "supernode.pid"

    @property
    def lock_file(self) -> Path:
        """Locked by the SuperNode and its executor for their life (one silo per folder)."""
        return self.root / "silo.lock"

    @property
    def executor_pid(self) -> Path:
        return self.root / "executor.pid"

    @property
    def supernode_log(self) -> Path:
        return self.root / "supernode.log"

    @property
    def executor_log(self) -> Path:
        return self.root / "executor.log"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def silo_log(self) -> Path:
        from fedguard.server.audit import SILO_LOG_NAME

        return self.root / SILO_LOG_NAME


# -- the deployed ServerApp's audit log and registry ------------------------------------------


class DeploymentRecorder:
    """Writes a deployed run to the audit log and the model registry.

    Driven by ``FederatedRun``'s ``on_round`` callback; reads each round's model from
    the checkpoint the orchestrator saved just before calling it. Use it around the
    run (``run-start`` on enter, ``run-end`` on exit: the run's outcome given to
    :meth:`finish`, ``failed`` with the reason on an exception)::

        layout = ServerLayout.from_env()
        with DeploymentRecorder.open(layout, run_id, config.to_options(), run_dir) as rec:
            run = FederatedRun(grid, config, run_id, run_dir, on_round=rec.on_round)
            run.run()
            rec.finish(run.outcome)

    Every write is idempotent per (run, round): on enter it also records any
    checkpointed round the log or the registry lacks (a server that died between
    saving a round and recording it), so a resumed run has each round exactly once.

    A run ends with a record whatever happens: ``run-start`` names the ServerApp's
    process (pid, start time, host), and :meth:`open` appends ``run-end`` with
    status ``killed`` for every earlier ``run-start`` without one whose process is
    gone (a ServerApp killed, or a machine that went down).
    """

    def __init__(
        self,
        layout: ServerLayout,
        run_id: str,
        config: Mapping[str, Any],
        run_dir: Path,
        audit: Any,
        registry: Any,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.layout = layout
        self.run_id = run_id
        self.config = dict(config)
        self.run_dir = run_dir
        self.audit = audit
        self.registry = registry
        self.extra = dict(extra or {})
        self.last_sha256: str | None = None
        self.outcome: Any = None  # the run's RunOutcome, from finish()

    @classmethod
    def open(
        cls,
        layout: ServerLayout,
        run_id: str,
        config: Mapping[str, Any],
        run_dir: Path,
        **extra: Any,
    ) -> DeploymentRecorder:
        """The recorder of a run starting now; first closes runs that ended unrecorded."""
        recorder = cls(
            layout,
            run_id,
            config,
            run_dir,
            layout.open_audit_log(),
            layout.open_registry(),
            extra,
        )
        recorder.close_unfinished_runs()
        return recorder

    def close_unfinished_runs(self) -> list[Any]:
        """``run-end`` ``killed`` for each earlier ``run-start`` whose process is gone."""
        from fedguard.server.round_records import RunStatus

        written = []
        for start in self.audit.unfinished_runs():
            process = start.payload.get("process") or {}
            if _process_alive(process):
                continue  # still running (another run on this SuperLink)
            run_id = str(start.payload.get("run_id"))
            rounds = [
                r.payload.get("round")
                for r in self.audit.records()
                if r.kind == "round" and r.payload.get("run_id") == run_id and r.seq > start.seq
            ]
            what = f"ServerApp pid {process['pid']}" if "pid" in process else "its ServerApp"
            reason = (
                f"ended without a final record: {what} is gone (killed, or its machine "
                f"stopped); found when run {self.run_id} started"
                + (f"; last round recorded: {rounds[-1]}" if rounds else "; no round recorded")
            )
            written.append(
                self.audit.run_end(
                    run_id,
                    RunStatus.KILLED.value,
                    reasons=[reason],
                    run_start_seq=start.seq,
                    model_sha256=_head_sha256(self.registry, run_id),
                )
            )
        return written

    def finish(self, outcome: Any) -> None:
        """The run's :class:`~fedguard.server.round_records.RunOutcome`, for ``run-end``."""
        self.outcome = outcome

    def __enter__(self) -> DeploymentRecorder:
        from fedguard.server.checkpoints import CheckpointStore

        store = CheckpointStore(self.run_dir / "checkpoints")
        done = store.rounds()
        self.audit.run_start(
            self.run_id,
            self.config,
            resumed_after_round=done[-1] if done else None,
            process=_process_identity(os.getpid()),
            **self.extra,
        )
        if done:
            history = store.load(done[-1]).state.get("history", [])
            by_round = {int(r["round"]): r for r in history}
            for number in done:
                if number in by_round:
                    self._record(by_round[number])
        return self

    def on_round(self, record: Any) -> None:
        """``FederatedRun``'s ``on_round``: register the round's model, audit the round."""
        self._record(record.to_dict() if hasattr(record, "to_dict") else dict(record))

    def _record(self, record: Mapping[str, Any]) -> None:
        from fedguard.server.checkpoints import CheckpointStore

        number = int(record["round"])
        arrays = CheckpointStore(self.run_dir / "checkpoints").load(number).arrays
        weights = {
            k.removeprefix("weights/"): v for k, v in arrays.items() if k.startswith("weights/")
        }
        parent = None
        if number > 0:
            previous = [m for m in self.registry.list(self.run_id) if m.round == number - 1]
            parent = previous[0].sha256 if previous else self.last_sha256
        evaluation = record.get("evaluation") or {}
        metrics = {
            "loss": evaluation.get("loss"),
            "accuracy": evaluation.get("accuracy"),
            "auc": evaluation.get("auc"),
        }
        model = self.registry.register(
            weights,
            run_id=self.run_id,
            round=number,
            parent_sha256=parent,
            config=self.config,
            metrics={k: v for k, v in metrics.items() if v is not None},
        )
        self.last_sha256 = model.sha256
        if number > 0:
            self.audit.record_round(
                self.run_id, record, model_sha256=model.sha256, parent_sha256=parent
            )

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            status, fields = "failed", {"reasons": [f"{type(exc).__name__}: {exc}"]}
        elif self.outcome is not None:
            fields = self.outcome.to_json()
            status = str(fields.pop("status"))
        else:
            status, fields = "completed", {"reasons": []}
        self.audit.run_end(self.run_id, status, model_sha256=self.last_sha256, **fields)
        self.registry.close()


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _process_identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "started": _process_start(pid), "host": socket.gethostname()}


def _process_alive(process: Mapping[str, Any]) -> bool:
    """Whether the process a ``run-start`` names still runs (another host: assumed so)."""
    pid = process.get("pid")
    if not isinstance(pid, int):
        return False  # a run-start from before processes were recorded
    if process.get("host") not in (None, socket.gethostname()):
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    started = process.get("started")
    return started is None or _process_start(pid) in (None, started)


def _head_sha256(registry: Any, run_id: str) -> str | None:
    try:
        head = registry.head(run_id)
    except Exception:  # the record is written even if the registry cannot say
        return None
    return getattr(head, "sha256", None)


# -- small helpers ---------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"cannot write the non-finite number {value} to TOML")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise ConfigError(f"cannot write a {type(value).__name__} to a Flower config: {value!r}")


def _toml_table(values: Mapping[str, object]) -> str:
    """TOML ``key = value`` lines; a ``None`` (an option left at its default) is left out,
    as TOML has no null and ``RunConfig.from_options`` reads a missing key as its default."""
    return "".join(
        f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in values.items() if v is not None
    )


def node_config_toml(
    silo_id: str,
    dataset: DatasetName,
    data_path: Path,
    state_dir: Path,
    budget: PrivacyBudget,
    signing_key: Path | None = None,
    secagg_identity: Path | None = None,
    consortium_key: Path | None = None,
) -> str:
    """The ``--node-config`` file of a silo (the keys ``fedguard.client.app`` reads).

    ``signing-key`` (the node key) lets the silo sign its log of what it sent;
    ``secagg-identity-key`` and ``consortium-key`` (its Ed25519 SecAgg identity key,
    and ``ca.crt`` or another key the roster must verify under) let it take part in
    authenticated secure aggregation.
    """
    values: dict[str, object] = {
        "silo-id": silo_id,
        "dataset": dataset.value,
        "data-path": str(data_path),
        "state-dir": str(state_dir),
        "target-epsilon": float(budget.epsilon),
        "delta": float(budget.delta),
    }
    if signing_key is not None:
        values["signing-key"] = str(signing_key)
    if (secagg_identity is None) != (consortium_key is None):
        raise ConfigError("a SecAgg identity needs both the identity key and the consortium key")
    if secagg_identity is not None and consortium_key is not None:
        values["secagg-identity-key"] = str(secagg_identity)
        values["consortium-key"] = str(consortium_key)
    return _toml_table(values)


def write_app(app_dir: Path, options: Mapping[str, object], name: str = "fedguard-run") -> Path:
    """Write the Flower app ``flwr run`` submits: the fedguard apps and ``options``.

    The app holds a ``pyproject.toml`` only (no code): the SuperNodes run the
    ``fedguard.client.app:app`` they installed, the SuperLink the installed
    ``fedguard.server.app:app``, and the run config is ``options``.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by `fedguard run`; Flower builds the run's app bundle from this file.\n"
        "[project]\n"
        f"name = {_toml_value(name)}\n"
        'version = "1.0.0"\n'
        'description = "A fedguard federated run"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedguard"\n\n'
        "[tool.flwr.app.components]\n"
        f"serverapp = {_toml_value(SERVERAPP_REF)}\n"
        f"clientapp = {_toml_value(CLIENTAPP_REF)}\n\n"
        "[tool.flwr.app.config]\n" + _toml_table(options)
    )
    path = app_dir / "pyproject.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _flower_tool(name: str) -> str:
    """A Flower executable from this interpreter's environment (or PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"cannot find Flower's `{name}`; is flwr installed here?")
    return found


def _environment(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _spawn(
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


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
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


def _reap(pid: int) -> int | None:
    """Collect ``pid``'s exit status if it is our child; None otherwise."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done == pid else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _write_pid(path: Path, pid: int) -> None:
    path.write_text(f"{pid}\n")


def stop_pid(pid: int, expect: str, timeout: float = _STOP_TIMEOUT_S) -> bool:
    """SIGTERM ``pid`` (if its command line contains ``expect``), SIGKILL after ``timeout``."""
    if not _alive(pid) or expect not in _cmdline(pid):
        _reap(pid)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        _reap(pid)
        time.sleep(0.05)
    return True


def _lock_folder(lock_file: Path, what: str) -> ProcessLock:
    """Take the folder's lock before any check or spawn, or fail at once naming the holder."""
    try:
        return ProcessLock.acquire(lock_file, what)
    except FolderLockedError as busy:
        raise AlreadyRunningError(str(busy)) from None


def _stop_holders(
    lock_file: Path, roles: Sequence[tuple[Path, str, str | None]], what: str
) -> list[str]:
    """Stop the folder's processes, then remove its PID files under its lock.

    ``roles``: ``(pid file, command-line marker, folder marker)`` in stopping order.
    Stopped are the processes that hold ``lock_file`` open and whose command line has
    the marker (the real holders, whatever the PID files say), and a PID file's
    process whose command line has both markers (one started without the lock).
    Raises :class:`AlreadyRunningError` if the lock is still held afterwards.
    """
    holders = lock_holders(lock_file)
    stopped: list[str] = []
    for pid_file, expect, folder in roles:
        pids = [pid for pid in holders if expect in _cmdline(pid)]
        recorded = _read_pid(pid_file)
        if recorded is not None and recorded not in pids:
            line = _cmdline(recorded)
            if expect in line and (folder is None or folder in line):
                pids.append(recorded)
        stopped += [f"{expect} PID {pid}" for pid in pids if stop_pid(pid, expect)]
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while True:
        try:
            lock = ProcessLock.acquire(lock_file, what)
        except FolderLockedError as busy:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            left = ", ".join(f"PID {p} ({_cmdline(p).strip()})" for p in lock_holders(lock_file))
            raise AlreadyRunningError(
                f"{busy}; still held after stopping {', '.join(stopped) or 'nothing'}"
                f"{f': {left}' if left else ''}"
            ) from None
        with lock:
            for pid_file, _, _ in roles:
                pid_file.unlink(missing_ok=True)
        return stopped


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(line.strip() for line in kept)


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"an address is HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _wait_for_port(host: str, port: int, pid: int, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if not _alive(pid):
            code = _reap(pid)
            raise DeploymentError(
                f"the process (PID {pid}) exited{f' with {code}' if code is not None else ''} "
                f"before it listened on {host}:{port}: {_tail(log_file)}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((connect_host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {host}:{port} after {timeout:.0f} s (PID {pid})")


def _run_flower(
    args: Sequence[str], flwr_home: Path, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [_flower_tool("flwr"), *args],
            env=_environment(flwr_home, {"NO_COLOR": "1", "COLUMNS": "200"}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeploymentError(
            f"`flwr {' '.join(args)}` did not finish in {timeout:.0f} s"
        ) from None


def _flower_json(args: Sequence[str], flwr_home: Path) -> dict[str, Any]:
    """Run ``flwr ... --format json`` and return its JSON answer (or raise with its error)."""
    done = _run_flower([*args, "--format", "json"], flwr_home)
    text = done.stdout.strip()
    start = text.find("{")
    try:
        answer = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or not answer.get("success", False):
        detail = (answer or {}).get("error-message") if isinstance(answer, dict) else None
        message = detail or (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        raise DeploymentError(f"`flwr {' '.join(args)}` failed: {message}")
    return answer


def write_connection(layout: ServerLayout, address: str) -> Path:
    """``<server-dir>/flwr-home/config.toml``: the Flower CLI's ``fedguard`` connection."""
    host, port = _parse_address(address)
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    path = layout.flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f"default = {_toml_value(CONNECTION)}\n\n"
        f"[superlink.{CONNECTION}]\n"
        f"address = {_toml_value(f'{connect}:{port}')}\n"
        f'"root-certificates" = {_toml_value(str(layout.ca_cert.resolve()))}\n'
    )
    return path


# -- ca / node -----------------------------------------------------------------------------


def cmd_ca_init(args: argparse.Namespace) -> int:
    from fedguard.core.pki import init_ca

    files = init_ca(
        Path(args.dir), common_name=args.name, valid_days=args.days, overwrite=args.force
    )
    print(f"CA certificate: {files.cert}\nCA key (keep it offline): {files.key}")
    return 0


def cmd_ca_issue_server(args: argparse.Namespace) -> int:
    from fedguard.core.pki import issue_server_cert

    files = issue_server_cert(
        Path(args.ca_dir), Path(args.out), args.host, valid_days=args.days, overwrite=args.force
    )
    print(
        f"server certificate: {files.cert} (hosts: {', '.join(files.hosts)})\n"
        f"server key: {files.key}\nCA certificate: {files.ca_cert}\n"
        f"audit signing key: {files.audit_key}\n"
        f"audit public key (give it to auditors): {files.audit_public_key}"
    )
    return 0


def cmd_node_keygen(args: argparse.Namespace) -> int:
    from fedguard.core.pki import SECAGG_IDENTITY_KEY, SECAGG_IDENTITY_PUB, node_keygen

    out = Path(args.out)
    files = node_keygen(out, comment=args.name or "", overwrite=args.force, secagg_identity=True)
    print(
        f"node private key (stays with the silo): {files.private_key}\n"
        f"node public key (send it to the consortium): {files.public_key}\n"
        f"SecAgg identity key (stays with the silo): {out / SECAGG_IDENTITY_KEY}\n"
        f"SecAgg identity public key (for the consortium's roster): {out / SECAGG_IDENTITY_PUB}"
    )
    return 0


def cmd_node_register(args: argparse.Namespace) -> int:
    layout = ServerLayout(Path(args.server_dir))
    command = ["supernode", "register", str(Path(args.public_key).resolve()), CONNECTION]
    if args.name:
        command += ["--name", args.name]
    answer = _flower_json(command, layout.flwr_home)
    print(f"registered node {answer.get('node-id')} ({args.public_key})")
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    layout = ServerLayout(Path(args.server_dir))
    answer = _flower_json(["supernode", "list", CONNECTION], layout.flwr_home)
    for node in answer.get("nodes", []):
        print(
            f"{node.get('node-id')}  {node.get('status')}  online-at {node.get('online-at')}"
            f"  created {node.get('created-at')}"
        )
    return 0


# -- server --------------------------------------------------------------------------------


def superlink_command(layout: ServerLayout, address: str) -> list[str]:
    host, port = _parse_address(address)
    for path in (layout.ca_cert, layout.cert, layout.key):
        if not path.exists():
            raise DeploymentError(
                f"{path} is missing; run `fedguard ca issue-server --out {layout.root}` first"
            )
    return [
        _flower_tool("flower-superlink"),
        "--ssl-ca-certfile",
        str(layout.ca_cert.resolve()),
        "--ssl-certfile",
        str(layout.cert.resolve()),
        "--ssl-keyfile",
        str(layout.key.resolve()),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(layout.database.resolve()),
        "--host",
        host,
        "--port",
        str(port),
    ]


def cmd_server_start(args: argparse.Namespace) -> int:
    layout = ServerLayout(Path(args.server_dir).resolve())
    if not layout.root.is_dir():
        raise DeploymentError(
            f"{layout.root} is not a server folder; run `fedguard ca issue-server --out "
            f"{layout.root}` first"
        )
    # The lock first: a second start fails here, before it checks, spawns or writes.
    with _lock_folder(layout.lock_file, "a SuperLink") as lock:
        command = superlink_command(layout, args.address)
        write_connection(layout, args.address)
        env = _environment(layout.flwr_home, {SERVER_DIR_ENV: str(layout.root)})
        if args.foreground:
            _write_pid(layout.pid_file, os.getpid())  # exec keeps the PID and the lock
            lock.inheritable()
            os.execve(command[0], command, env)
        pid = _spawn(command, layout.log_file, env, layout.root, lock)
        lock.record(pid)
        _write_pid(layout.pid_file, pid)
        host, port = _parse_address(args.address)
        try:
            _wait_for_port(host, port, pid, layout.log_file, args.timeout)
        except BaseException:
            stop_pid(pid, "flower-superlink", timeout=5.0)
            layout.pid_file.unlink(missing_ok=True)
            raise
    print(f"SuperLink PID {pid} on {args.address} (TLS, node authentication)")
    print(f"  log: {layout.log_file}\n  state: {layout.database}")
    return 0


def cmd_server_stop(args: argparse.Namespace) -> int:
    layout = ServerLayout(Path(args.server_dir).resolve())
    if not layout.root.is_dir():
        print(f"no SuperLink running from {layout.root}")
        return 0
    stopped = _stop_holders(
        layout.lock_file,
        [(layout.pid_file, "flower-superlink", str(layout.database.resolve()))],
        "a SuperLink",
    )
    if not stopped:
        print(f"no SuperLink running from {layout.root}")
        return 0
    print(f"stopped {', '.join(stopped).replace('flower-superlink', 'SuperLink')}")
    return 0


# -- client --------------------------------------------------------------------------------


def supernode_command(
    superlink: str,
    ca_cert: Path,
    key: Path,
    node_config: Path,
    runtime_port: int,
    executor: str,
) -> list[str]:
    command = [
        _flower_tool("flower-supernode"),
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


class ActivationRefusedError(DeploymentError):
    """The SuperLink refused to activate the node (Flower exit code 305)."""


_REFUSED_HINT = (
    "exit 305: the SuperLink refused to activate this node. Either its public key is not "
    "registered (`fedguard node register KEY.pub` on the server), or a SuperNode with this "
    "key is still marked online (one that died less than about a minute ago: Flower marks "
    "a node offline after two missed 30 s heartbeats)"
)


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
        if not _alive(pid):
            code = _reap(pid)
            if "Exit Code: 305" in text:
                raise ActivationRefusedError(f"the SuperNode (PID {pid}) exited ({_REFUSED_HINT})")
            raise DeploymentError(
                f"the SuperNode (PID {pid}) exited"
                f"{f' with {code}' if code is not None else ''}: {_tail(log_file)}"
            )
        time.sleep(0.2)
    raise DeploymentError(f"the SuperNode (PID {pid}) did not connect in {timeout:.0f} s")


def _start_supernode(
    command: Sequence[str],
    layout: SiloLayout,
    env: Mapping[str, str],
    args: argparse.Namespace,
    lock: ProcessLock,
) -> tuple[int, str]:
    """Start the SuperNode; while activation is refused, retry for ``--activation-retry`` s.

    Runs while this process holds the silo's ``lock``; each SuperNode inherits it.
    """
    retry_until = time.monotonic() + args.activation_retry
    while True:
        offset = layout.supernode_log.stat().st_size if layout.supernode_log.exists() else 0
        pid = _spawn(command, layout.supernode_log, env, layout.root, lock)
        lock.record(pid)
        _write_pid(layout.supernode_pid, pid)
        try:
            return pid, _wait_for_supernode(pid, layout.supernode_log, offset, args.timeout)
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


def cmd_client_start(args: argparse.Namespace) -> int:
    layout = SiloLayout(Path(args.state_dir).resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    # The lock first: a second start on this folder fails here, before any check or write.
    with _lock_folder(layout.lock_file, "a SuperNode") as lock:
        data = Path(args.data).resolve()
        if not data.is_file():
            raise DeploymentError(f"silo data file {data} does not exist")
        for path, what in ((Path(args.ca_cert), "CA certificate"), (Path(args.key), "node key")):
            if not path.is_file():
                raise DeploymentError(f"{what} {path} does not exist")
        _parse_address(args.superlink)
        if args.activation_retry < 0:
            raise ConfigError(f"--activation-retry must be >= 0, got {args.activation_retry}")
        budget = PrivacyBudget(args.target_epsilon, args.delta)
        silo_id = args.silo_id or layout.root.name
        from fedguard.server.roster_commands import silo_identity_paths

        identity = silo_identity_paths(
            args.secagg_identity, Path(args.key), args.consortium_key, Path(args.ca_cert)
        )
        node_config = node_config_toml(
            silo_id,
            DatasetName.parse(args.dataset),
            data,
            layout.root,
            budget,
            signing_key=Path(args.key).resolve(),
            secagg_identity=identity[0] if identity else None,
            consortium_key=identity[1] if identity else None,
        )
        spent = _check_silo_state(node_config, layout)
        layout.node_config.write_text(node_config)
        command = supernode_command(
            args.superlink,
            Path(args.ca_cert),
            Path(args.key),
            layout.node_config,
            args.runtime_port,
            args.executor,
        )
        env = _environment(layout.flwr_home)
        pid, node_id = _start_supernode(command, layout, env, args, lock)
        executor_pid = None
        if args.executor == ExecutorMode.WARM:
            executor = [
                sys.executable,
                "-m",
                "fedguard.client.executor",
                "--runtime-api-address",
                f"127.0.0.1:{args.runtime_port}",
                "--parent-pid",
                str(pid),
            ]
            try:
                executor_pid = _spawn(executor, layout.executor_log, env, layout.root, lock)
            except BaseException:
                stop_pid(pid, "flower-supernode", timeout=5.0)
                layout.supernode_pid.unlink(missing_ok=True)
                raise
            _write_pid(layout.executor_pid, executor_pid)
        print(
            f"silo {silo_id}: SuperNode PID {pid}, node ID {node_id}, connected to {args.superlink}"
        )
        if executor_pid is not None:
            print(f"  warm ClientApp executor PID {executor_pid}")
        print(f"  ledger: ε {spent:.6g} of {budget.epsilon:g} spent (checked against the silo log)")
        print(f"  log: {layout.supernode_log}")
        if args.foreground:
            return _wait_foreground(pid, executor_pid)
    return 0


def _wait_foreground(pid: int, executor_pid: int | None) -> int:
    def forward(signum: int, _frame: object) -> None:
        os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = None
    while code is None and _alive(pid):
        code = _reap(pid)
        time.sleep(0.5)
    if code is None:
        code = _reap(pid)
    if executor_pid is not None:
        stop_pid(executor_pid, "fedguard.client.executor", timeout=5.0)
    return code or 0


def cmd_client_stop(args: argparse.Namespace) -> int:
    layout = SiloLayout(Path(args.state_dir).resolve())
    if not layout.root.is_dir():
        print(f"nothing running for {layout.root}")
        return 0
    stopped = _stop_holders(
        layout.lock_file,
        [
            (layout.supernode_pid, "flower-supernode", str(layout.node_config.resolve())),
            (layout.executor_pid, "fedguard.client.executor", None),
        ],
        "a SuperNode",
    )
    print("stopped " + ", ".join(stopped) if stopped else f"nothing running for {layout.root}")
    return 0


# -- run -----------------------------------------------------------------------------------


def run_options(config_file: Path, layout: ServerLayout) -> dict[str, Any]:
    """The run config of ``fedguard run``: the TOML file's options, checked, made absolute."""
    try:
        options: dict[str, Any] = tomllib.loads(Path(config_file).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {config_file} does not exist") from None
    except tomllib.TOMLDecodeError as bad:
        raise ConfigError(f"config file {config_file} is not valid TOML: {bad}") from None
    config = RunConfig.from_options(options)
    resolved = config.to_options()
    # Run folders land in the server folder unless the config says otherwise (relative
    # paths are taken from where `fedguard run` is called, not the SuperLink's folder).
    resolved["out"] = str(
        (Path(str(options["out"])).resolve()) if "out" in options else layout.runs.resolve()
    )
    if not resolved["run-name"]:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        resolved["run-name"] = f"{Path(config_file).stem}-{stamp}"
    return resolved


def cmd_run(args: argparse.Namespace) -> int:
    layout = ServerLayout(Path(args.server_dir).resolve())
    if not (layout.flwr_home / "config.toml").exists():
        raise DeploymentError(f"no SuperLink connection in {layout.flwr_home}; start the server")
    options = run_options(Path(args.config), layout)
    from fedguard.server.secure_round import check_dropout_tolerance

    check_dropout_tolerance(RunConfig.from_options(options))  # before anything starts
    run_name = str(options["run-name"])
    run_dir = Path(str(options["out"])) / run_name
    if lock_is_held(run_dir / RUN_LOCK):
        holder = lock_holder(run_dir / RUN_LOCK)
        raise RunActiveError(
            f"run {run_name} is running (its ServerApp, PID {holder}, holds "
            f"{run_dir / RUN_LOCK}); wait for it, or stop it with `flwr stop`, before "
            "starting it again"
        )
    for stale in stop_unfinished_attempts(layout, run_name):
        print(
            f"run {run_name}: stopped Flower run {stale}, an earlier attempt that had not "
            "finished (Flower would launch its ServerApp again beside this one)"
        )
    app = layout.apps / run_name
    write_app(app, options)  # only once the run may start (a refusal changes nothing)
    logged_before = _last_audit_seq(layout)
    # The run name also as an override: Flower lists overrides with each run
    # (stop_unfinished_attempts finds earlier attempts by it); the value is the same.
    answer = _flower_json(
        ["run", str(app), CONNECTION, "--run-config", f"run-name={_toml_value(run_name)}"],
        layout.flwr_home,
    )
    flower_run = str(answer.get("run-id"))
    print(f"run {run_name}: Flower run {flower_run} started")
    print(f"  run folder: {run_dir}")
    done = sorted((run_dir / "checkpoints").glob("round-*.json"))
    if done:
        print(f"  checkpoints up to {done[-1].stem}: the run resumes after that round")
    if not args.wait:
        return 0
    status, details = wait_for_run(layout, flower_run, args.timeout)
    end = run_end_record(layout, run_name, logged_before)
    print(f"run {run_name}: {status}" + (f" ({details})" if details else ""))
    if end is None:
        print(f"run {run_name}: no run-end in {layout.audit_log}: it ended without a final record")
    else:
        reasons = [str(r) for r in end.get("reasons") or []]
        print(f"run {run_name}: {end.get('status')}" + "".join(f"\n  {r}" for r in reasons))
    return run_exit_status(status, end)


#: ``fedguard run --wait`` exit statuses: the run finished, but not as planned
#: (``degraded``, or ``stopped`` on the central DP budget); any other failure is 1.
EXIT_NOT_AS_PLANNED = 3


def run_exit_status(flower_status: str, run_end: Mapping[str, Any] | None) -> int:
    """``fedguard run --wait``'s exit status from Flower's status and the run's ``run-end``.

    0 only when Flower says ``finished:completed`` and the audit log's ``run-end``
    says ``completed``; :data:`EXIT_NOT_AS_PLANNED` (3) for ``degraded`` and
    ``stopped``; 1 for ``failed``, ``killed``, a Flower failure, or no ``run-end``.
    """
    if flower_status != "finished:completed" or run_end is None:
        return 1
    status = str(run_end.get("status", ""))
    if status == "completed":
        return 0
    if status in ("degraded", "stopped"):
        return EXIT_NOT_AS_PLANNED
    return 1


def _last_audit_seq(layout: ServerLayout) -> int:
    from fedguard.server.audit import AuditError, read_records

    if not layout.audit_log.exists():
        return -1
    try:
        records = read_records(layout.audit_log)
    except AuditError:
        return -1
    return records[-1].seq if records else -1


def run_end_record(
    layout: ServerLayout, run_id: str, after_seq: int = -1, wait: float = 10.0
) -> dict[str, Any] | None:
    """The payload of the ``run-end`` closing the last ``run-start`` of ``run_id`` written
    after ``after_seq``; None if there is none (the run ended without a final record).

    Waits up to ``wait`` s for it (the ServerApp writes it just before it exits).
    """
    from fedguard.server.audit import AuditError, read_records

    deadline = time.monotonic() + wait
    while True:
        try:
            records = read_records(layout.audit_log) if layout.audit_log.exists() else []
        except AuditError:
            records = []
        mine = [r for r in records if r.seq > after_seq and r.payload.get("run_id") == run_id]
        starts = [r.seq for r in mine if r.kind == "run-start"]
        # After this run's own start: a `killed` record for an earlier process of the
        # same run (written when it resumed) is not this run's end.
        ends = [r.payload for r in mine if r.kind == "run-end" and starts and r.seq > starts[-1]]
        if ends:
            return dict(ends[-1])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


@contextlib.contextmanager
def control_client(layout: ServerLayout) -> Iterator[Any]:
    """Flower's own Control API client for the ``fedguard`` connection, in this process.

    (``flwr ls`` would do the same from a new process: about a second of CPU per call.)
    A SuperLink that cannot be reached, now or during the ``with`` body, raises
    :class:`SuperLinkUnreachableError` (not httpx's own error).
    """
    import httpx
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(layout.flwr_home)
    connection = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            connection = read_superlink_connection(CONNECTION)
            client = init_http_client_from_connection(connection)
        try:
            yield client
        finally:
            client.close()
    except httpx.TransportError as unreachable:
        address = getattr(connection, "address", None) or "its configured address"
        raise SuperLinkUnreachableError(
            f"cannot reach the SuperLink at {address} ({unreachable}); is it running? "
            f"(`fedguard server start --server-dir {layout.root}` starts it)"
        ) from None
    finally:
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous


def stop_unfinished_attempts(layout: ServerLayout, run_name: str) -> list[int]:
    """Stop the SuperLink's unfinished Flower runs of ``run_name``; their run ids.

    Called by ``fedguard run`` once no ServerApp holds the run's lock: an unfinished
    Flower run of the same name is then an attempt whose ServerApp is gone (killed,
    or its SuperLink was), which Flower would launch again once its task token
    expires. Stopped, it stays finished; :data:`RUN_LOCK` covers the instant between.
    """
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest, StopRunRequest

    stopped = []
    with control_client(layout) as client:
        response = client.ListRuns(ListRunsRequest(limit=_LISTED_RUNS))
        for proto in response.run_dict.values():
            run = run_from_proto(proto)
            if run.status.status == "finished":
                continue
            if str(run.override_config.get("run-name", "")) != run_name:
                continue
            client.StopRun(StopRunRequest(run_id=run.run_id))
            stopped.append(int(run.run_id))
    return sorted(stopped)


#: How long ``fedguard run --wait`` keeps asking a SuperLink that stopped answering.
_UNREACHABLE_GRACE_S = 60.0

#: How many of the SuperLink's latest runs ``fedguard run`` looks through.
_LISTED_RUNS = 500


def run_status(client: Any, flower_run: str) -> tuple[str, str]:
    """``(status, details)`` of a Flower run, e.g. ``("finished:completed", "")``."""
    from flwr.proto.control_pb2 import ListRunsRequest

    run_id = int(flower_run)
    response = client.ListRuns(ListRunsRequest(run_id=run_id))
    if run_id not in response.run_dict:
        raise DeploymentError(f"the SuperLink knows no run {flower_run}")
    status = response.run_dict[run_id].status
    text = f"{status.status}:{status.sub_status}" if status.sub_status else status.status
    return text, status.details


def wait_for_run(
    layout: ServerLayout, flower_run: str, timeout: float, poll: float = 2.0
) -> tuple[str, str]:
    """Wait until a Flower run is finished; ``(status, details)``.

    A SuperLink that stops answering is asked again for up to
    :data:`_UNREACHABLE_GRACE_S` (a restart keeps its runs); longer, or unreachable
    at the start, raises :class:`SuperLinkUnreachableError`.
    """
    import httpx

    deadline = time.monotonic() + timeout
    with control_client(layout) as client:
        status, details = run_status(client, flower_run)  # unreachable now: fail at once
        lost_at: float | None = None
        while True:
            try:
                status, details = run_status(client, flower_run)
                lost_at = None
            except httpx.TransportError:
                lost_at = lost_at or time.monotonic()
                if time.monotonic() - lost_at > _UNREACHABLE_GRACE_S:
                    raise
                time.sleep(poll)
                continue
            if status.startswith("finished"):
                return status, details
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"Flower run {flower_run} still {status} after {timeout:.0f} s"
                )
            time.sleep(poll)


# -- audit and models --------------------------------------------------------------------------


def _parse_head(text: str | None) -> tuple[int, str] | None:
    if text is None:
        return None
    seq, sep, sha = text.partition(":")
    if not sep or not seq.isdigit() or len(sha) != 64:
        raise ConfigError(f"--expect-head is SEQ:SHA256, got {text!r}")
    return int(seq), sha.lower()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fedguard.core.pki import load_public_key
    from fedguard.server.audit import verify_audit_log, verify_silo_log

    key = load_public_key(Path(args.public_key)) if args.public_key else None
    head = _parse_head(args.expect_head)
    if args.silo:
        report = verify_silo_log(Path(args.log), key, expected_head=head)
    else:
        if key is None:
            raise ConfigError("verifying a server audit log needs --public-key (audit.pub)")
        report = verify_audit_log(Path(args.log), key, expected_head=head)
    print(f"{args.log}: {report.summary()}")
    return 0 if report.ok else 1


def _registry_dir(args: argparse.Namespace) -> Path:
    if args.registry:
        return Path(args.registry)
    return ServerLayout(Path(args.server_dir)).registry


def cmd_models(args: argparse.Namespace) -> int:
    from fedguard.server.registry import ModelRegistry

    with ModelRegistry.open(_registry_dir(args)) as registry:
        if args.models_command == "list":
            records = registry.list(args.run)
            if not records:
                print("no models registered")
            for r in records:
                metrics = ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in sorted(r.metrics.items())
                    if isinstance(v, (int, float))
                )
                mark = "*" if r.is_head else " "
                parent = r.parent_sha256[:12] if r.parent_sha256 else "-" * 12
                print(
                    f"{mark} {r.sha256[:12]}  parent {parent}  {r.run_id}  "
                    f"round {r.round:>3}  {metrics}"
                )
        elif args.models_command == "show":
            record = registry.get(args.hash, args.run)
            lineage = [m.sha256 for m in registry.lineage(record.sha256, record.run_id)]
            print(json.dumps({**record.to_dict(), "lineage": lineage}, indent=2))
        else:
            record = registry.rollback(args.hash, args.run, args.reason or "")
            print(f"run {record.run_id}: head is now {record.sha256[:12]} (round {record.round})")
    return 0


# -- parsers -------------------------------------------------------------------------------


def _server_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server-dir",
        default="server",
        metavar="DIR",
        help="the consortium server's folder (certificate, keys, state) [default: server]",
    )


def _with_handler(p: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    p.set_defaults(deploy_handler=handler)


def add_deploy_commands(sub: Any) -> None:
    """Add ``ca``, ``node``, ``server``, ``client``, ``run``, ``audit``, ``models``.

    Each parser sets ``deploy_handler``; the caller runs ``args.deploy_handler(args)``.
    """
    fmt = argparse.ArgumentDefaultsHelpFormatter

    ca = sub.add_parser("ca", help="the consortium's certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    p = ca_sub.add_parser(
        "init", help="create the consortium CA", formatter_class=fmt,
        description="Create a self-signed consortium CA (ECDSA P-384): DIR/ca.crt, DIR/ca.key.",
    )  # fmt: skip
    p.add_argument("--dir", default="ca", help="folder for ca.crt and ca.key")
    p.add_argument("--name", default="fedguard consortium CA", help="the CA's common name")
    p.add_argument("--days", type=int, default=3650, help="validity in days")
    p.add_argument("--force", action="store_true", help="overwrite existing key material")
    _with_handler(p, cmd_ca_init)
    p = ca_sub.add_parser(
        "issue-server", help="issue the SuperLink's TLS certificate", formatter_class=fmt,
        description="Issue the SuperLink's TLS certificate signed by the CA (localhost and "
        "127.0.0.1 always in its subjectAltName) and make the server's Ed25519 audit key.",
    )  # fmt: skip
    p.add_argument("--ca-dir", default="ca", help="folder of ca.crt and ca.key")
    p.add_argument("--out", default="server", help="the server folder to write into")
    p.add_argument(
        "--host", action="append", default=[], metavar="NAME_OR_IP",
        help="a host name or IP address silos use to reach the SuperLink (repeatable)",
    )  # fmt: skip
    p.add_argument("--days", type=int, default=825, help="validity in days")
    p.add_argument("--force", action="store_true", help="overwrite an existing certificate")
    _with_handler(p, cmd_ca_issue_server)
    from fedguard.server.roster_commands import add_sign_roster_parser

    add_sign_roster_parser(ca_sub, fmt, _with_handler)

    node = sub.add_parser("node", help="silo node keys and registration")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    p = node_sub.add_parser(
        "keygen", help="make a silo's SuperNode key pair", formatter_class=fmt,
        description="Make a SuperNode authentication key pair (ECDSA P-384, OpenSSH "
        "format, as Flower reads it): OUT/node.key (mode 0600) and OUT/node.pub, and the "
        "silo's SecAgg identity key (Ed25519, PEM): OUT/secagg-identity.key (0600) and "
        "OUT/secagg-identity.pub (for the consortium's roster).",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the key files")
    p.add_argument("--name", default="", help="comment written after the public key")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    _with_handler(p, cmd_node_keygen)
    p = node_sub.add_parser(
        "register", help="allow a silo's key to join (flwr supernode register)",
        formatter_class=fmt,
        description="Register a silo's public key with the running SuperLink "
        "(`flwr supernode register KEY.pub fedguard`). Only registered keys may join.",
    )  # fmt: skip
    p.add_argument("public_key", metavar="KEY.pub", help="the silo's node.pub")
    p.add_argument("--name", default="", help="a name for the node")
    _server_dir_arg(p)
    _with_handler(p, cmd_node_register)
    p = node_sub.add_parser("list", help="list registered nodes (flwr supernode list)")
    _server_dir_arg(p)
    _with_handler(p, cmd_node_list)

    server = sub.add_parser("server", help="the consortium server (Flower SuperLink)")
    server_sub = server.add_subparsers(dest="server_command", required=True, metavar="COMMAND")
    p = server_sub.add_parser(
        "start", help="start the SuperLink with TLS and node authentication", formatter_class=fmt,
        description="Start flower-superlink with the server folder's certificate, "
        "--enable-supernode-auth, --disable-runtime-dependency-installation and "
        "--database SERVER_DIR/superlink.db, in the background (PID in superlink.pid).",
    )  # fmt: skip
    _server_dir_arg(p)
    p.add_argument(
        "--address", default=DEFAULT_SERVER_ADDRESS, metavar="HOST:PORT",
        help="where the SuperLink listens (Fleet, Control and Runtime APIs share it)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=_READY_TIMEOUT_S, help="seconds to wait")
    p.add_argument(
        "--foreground", action="store_true", help="replace this process (for a service manager)"
    )
    _with_handler(p, cmd_server_start)
    p = server_sub.add_parser("stop", help="stop the SuperLink started from --server-dir")
    _server_dir_arg(p)
    _with_handler(p, cmd_server_stop)

    client = sub.add_parser("client", help="a silo's agent (Flower SuperNode)")
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    defaults = RunConfig()
    p = client_sub.add_parser(
        "start", help="start this silo's SuperNode", formatter_class=fmt,
        description="Start flower-supernode with the consortium CA, this silo's node key "
        "and its node config (data path, state folder, privacy budget), in the background. "
        "With --executor warm (default) the SuperNode runs with --isolation process and "
        "fedguard's warm executor runs its ClientApps (see fedguard.client.executor).",
    )  # fmt: skip
    p.add_argument("--data", required=True, metavar="PATH", help="this silo's CSV file")
    p.add_argument("--state-dir", required=True, metavar="DIR", help="ledger, logs, PIDs")
    p.add_argument("--superlink", default=DEFAULT_SERVER_ADDRESS, metavar="HOST:PORT")
    p.add_argument("--ca-cert", default="ca.crt", metavar="FILE", help="the consortium CA")
    p.add_argument("--key", default="node.key", metavar="FILE", help="this silo's node key")
    from fedguard.server.roster_commands import add_client_identity_arguments

    add_client_identity_arguments(p)
    p.add_argument("--silo-id", default=None, help="[default: the state folder's name]")
    p.add_argument(
        "--dataset", default=defaults.dataset.value, choices=[d.value for d in DatasetName]
    )
    p.add_argument("--target-epsilon", type=float, default=defaults.budget.epsilon)
    p.add_argument("--delta", type=float, default=defaults.budget.delta)
    p.add_argument(
        "--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT,
        help="loopback port of the SuperNode's Runtime API (one per silo on a machine)",
    )  # fmt: skip
    p.add_argument("--executor", choices=ExecutorMode.CHOICES, default=ExecutorMode.WARM)
    p.add_argument(
        "--activation-retry", type=float, default=90.0, metavar="SECONDS",
        help="keep retrying this long while the SuperLink refuses activation (exit 305)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=_READY_TIMEOUT_S, help="seconds to wait")
    p.add_argument("--foreground", action="store_true", help="stay until the SuperNode exits")
    _with_handler(p, cmd_client_start)
    p = client_sub.add_parser("stop", help="stop the SuperNode started for --state-dir")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    _with_handler(p, cmd_client_stop)
    from fedguard.client.ledger_commands import add_reset_ledger_command

    add_reset_ledger_command(client_sub)

    p = sub.add_parser(
        "run", help="start a federated run on the SuperLink (flwr run)", formatter_class=fmt,
        description="Start a fedguard run on the running SuperLink: CONFIG is a TOML file "
        "with `fedguard simulate` option names (dataset, clients, rounds, ...). Runs "
        "`flwr run` on a generated app that holds no code.",
    )  # fmt: skip
    p.add_argument("config", metavar="CONFIG.toml")
    _server_dir_arg(p)
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the run to finish; exit 0 if it completed, 3 if it was degraded or "
        "stopped on the central DP budget, 1 if it failed",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    _with_handler(p, cmd_run)

    audit = sub.add_parser("audit", help="verify audit logs")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = audit_sub.add_parser(
        "verify", help="verify an audit log's chain and signatures", formatter_class=fmt,
        description="Recompute every record's hash and signature and check the chain; "
        "exit 0 if intact, 1 naming the first bad record.",
    )  # fmt: skip
    p.add_argument("log", metavar="LOG")
    p.add_argument("--public-key", default=None, metavar="KEY", help="audit.pub (or node.pub)")
    p.add_argument("--expect-head", default=None, metavar="SEQ:SHA256", help="a known head")
    p.add_argument("--silo", action="store_true", help="LOG is a silo's silo-log.jsonl")
    _with_handler(p, cmd_audit_verify)

    models = sub.add_parser("models", help="the model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    for name, text in (
        ("list", "list registered models (* marks a run's head)"),
        ("show", "show one model, its config, metrics and lineage"),
        ("rollback", "make a model its run's head again (recorded)"),
    ):
        p = models_sub.add_parser(name, help=text)
        if name != "list":
            p.add_argument("hash", metavar="HASH", help="a model hash or a prefix (>= 4 digits)")
        p.add_argument("--run", default=None, help="only this run")
        if name == "rollback":
            p.add_argument("--reason", default="", help="why (kept in the registry)")
        _server_dir_arg(p)
        p.add_argument("--registry", default=None, metavar="DIR", help="[SERVER_DIR/registry]")
        _with_handler(p, cmd_models)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedguard.server.commands ...``: the deployment commands on their own."""
    parser = argparse.ArgumentParser(prog="fedguard", description="fedguard deployment")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_deploy_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.deploy_handler(args))
    except FedguardError as error:
        print(f"fedguard: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
