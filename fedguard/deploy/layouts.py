"""Where a deployment keeps everything: the server folder, a silo's state folder.

The server keeps everything in one folder (``--server-dir``, see
:class:`ServerLayout`): its certificate and keys, the SuperLink's database, PID
and log, the Flower CLI's configuration (``flwr-home/config.toml``, with one
SuperLink connection named ``fedguard``), the run folders, the audit log and the
model registry. The SuperLink is started with ``FEDGUARD_SERVER_DIR`` in its
environment, which every ServerApp it starts inherits: that is how the deployed
ServerApp finds the audit key and the registry (:meth:`ServerLayout.from_env`);
key material never travels in a run's config. A silo keeps everything in its
state folder (``--state-dir``, see :class:`SiloLayout`): the privacy ledger,
its log of what it sent, its node config, PIDs and logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedguard.core.errors import ConfigError
from fedguard.deploy.bundles import toml_value
from fedguard.deploy.errors import DeploymentError

if TYPE_CHECKING:
    from fedguard.audit.registry import ModelRegistry
    from fedguard.audit.server_log import AuditLog
    from fedguard.privacy.secagg.roster import SignedRoster

__all__ = [
    "CONNECTION",
    "SERVER_DIR_ENV",
    "ServerLayout",
    "SiloLayout",
    "parse_address",
    "write_connection",
]

#: Name of the SuperLink connection in ``<server-dir>/flwr-home/config.toml``.
CONNECTION = "fedguard"
#: Environment variable that tells a deployed ServerApp where its server folder is.
SERVER_DIR_ENV = "FEDGUARD_SERVER_DIR"


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

    def open_audit_log(self) -> AuditLog:
        """The server's :class:`~fedguard.audit.server_log.AuditLog`, signed with ``audit.key``."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from fedguard.audit.pki import load_private_key
        from fedguard.audit.server_log import AuditLog

        key = load_private_key(self.audit_key)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DeploymentError(f"{self.audit_key} is not an Ed25519 key")
        return AuditLog.open(self.audit_log, key)

    def open_registry(self) -> ModelRegistry:
        """The server's :class:`~fedguard.audit.registry.ModelRegistry`."""
        from fedguard.audit.registry import ModelRegistry

        return ModelRegistry.open(self.registry)

    def load_roster(self) -> SignedRoster | None:
        """The signed SecAgg roster (``secagg-roster.json``), or None if there is none."""
        from fedguard.deploy.roster import load_server_roster

        return load_server_roster(self.root)


@dataclass(frozen=True)
class SiloLayout:
    """Where a silo keeps everything (``--state-dir``)."""

    root: Path

    @property
    def node_config(self) -> Path:
        """Written by ``fedguard client start``."""
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
        from fedguard.audit.logs import SILO_LOG_NAME

        return self.root / SILO_LOG_NAME


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` too) as ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"an address is HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def write_connection(layout: ServerLayout, address: str) -> Path:
    """``<server-dir>/flwr-home/config.toml``: the Flower CLI's ``fedguard`` connection."""
    host, port = parse_address(address)
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    path = layout.flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f"default = {toml_value(CONNECTION)}\n\n"
        f"[superlink.{CONNECTION}]\n"
        f"address = {toml_value(f'{connect}:{port}')}\n"
        f'"root-certificates" = {toml_value(str(layout.ca_cert.resolve()))}\n'
    )
    return path
