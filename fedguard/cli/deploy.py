"""The deployment commands' parsers and handlers: ``ca``, ``node``, ``server``,
``client``, ``run``, ``audit`` and ``models``.

Each handler turns its parsed arguments into a call of :mod:`fedguard.deploy`
(which says which Flower command each step runs; its package docstring has the
table) and returns the exit status. Building the parsers imports no Flower, torch
or scipy: the handlers' modules import them when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedguard.core.config import DatasetName, RunConfig
from fedguard.deploy.layouts import ServerLayout
from fedguard.deploy.roster import ROSTER_FILE
from fedguard.deploy.superlink import DEFAULT_SERVER_ADDRESS
from fedguard.deploy.supernode import DEFAULT_RUNTIME_PORT, ClientStart, ExecutorMode
from fedguard.deploy.supervision import READY_TIMEOUT_S

__all__ = [
    "add_deploy_commands",
    "cmd_audit_verify",
    "cmd_ca_init",
    "cmd_ca_issue_server",
    "cmd_ca_sign_roster",
    "cmd_client_reset_ledger",
    "cmd_client_start",
    "cmd_client_stop",
    "cmd_models_list",
    "cmd_models_rollback",
    "cmd_models_show",
    "cmd_node_keygen",
    "cmd_node_list",
    "cmd_node_register",
    "cmd_run",
    "cmd_server_start",
    "cmd_server_stop",
]

Handler = Callable[[argparse.Namespace], int]
_FMT = argparse.ArgumentDefaultsHelpFormatter


# -- handlers: ca / node ---------------------------------------------------------------------


def cmd_ca_init(args: argparse.Namespace) -> int:
    from fedguard.audit.pki import init_ca

    files = init_ca(
        Path(args.dir), common_name=args.name, valid_days=args.days, overwrite=args.force
    )
    print(f"CA certificate: {files.cert}\nCA key (keep it offline): {files.key}")
    return 0


def cmd_ca_issue_server(args: argparse.Namespace) -> int:
    from fedguard.audit.pki import issue_server_cert

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


def cmd_ca_sign_roster(args: argparse.Namespace) -> int:
    from fedguard.audit.pki import CA_KEY
    from fedguard.deploy.roster import parse_silo_keys, sign_roster_files

    key = Path(args.key) if args.key else Path(args.ca_dir) / CA_KEY
    signed = sign_roster_files(
        key,
        parse_silo_keys(args.silo),
        Path(args.out),
        serial=args.serial,
        consortium=args.consortium,
    )
    roster = signed.roster
    print(
        f"roster {args.out}: serial {roster.serial}, {len(roster.silos)} silo(s) "
        f"({', '.join(roster.silos)}), signed {signed.algorithm} by {signed.signer}"
    )
    print("  give it to the server (SERVER_DIR/secagg-roster.json); silos verify it with ca.crt")
    return 0


def cmd_node_keygen(args: argparse.Namespace) -> int:
    from fedguard.audit.pki import SECAGG_IDENTITY_KEY, SECAGG_IDENTITY_PUB, node_keygen

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
    from fedguard.deploy.flower_control import register_node

    answer = register_node(ServerLayout(Path(args.server_dir)), Path(args.public_key), args.name)
    print(f"registered node {answer.get('node-id')} ({args.public_key})")
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    from fedguard.deploy.flower_control import list_nodes

    for node in list_nodes(ServerLayout(Path(args.server_dir))):
        print(
            f"{node.get('node-id')}  {node.get('status')}  online-at {node.get('online-at')}"
            f"  created {node.get('created-at')}"
        )
    return 0


# -- handlers: server / client / run -------------------------------------------------------


def cmd_server_start(args: argparse.Namespace) -> int:
    from fedguard.deploy.superlink import start_superlink

    return start_superlink(Path(args.server_dir), args.address, args.timeout, args.foreground)


def cmd_server_stop(args: argparse.Namespace) -> int:
    from fedguard.deploy.superlink import stop_superlink

    return stop_superlink(Path(args.server_dir))


def cmd_client_start(args: argparse.Namespace) -> int:
    from fedguard.deploy.supernode import start_client

    return start_client(
        ClientStart(
            state_dir=Path(args.state_dir),
            data=Path(args.data),
            superlink=args.superlink,
            ca_cert=Path(args.ca_cert),
            key=Path(args.key),
            dataset=args.dataset,
            contract=args.contract,
            model_factory=args.model_factory,
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            runtime_port=args.runtime_port,
            executor=args.executor,
            activation_retry=args.activation_retry,
            timeout=args.timeout,
            foreground=args.foreground,
            silo_id=args.silo_id,
            secagg_identity=args.secagg_identity,
            consortium_key=args.consortium_key,
        )
    )


def cmd_client_stop(args: argparse.Namespace) -> int:
    from fedguard.deploy.supernode import stop_client

    return stop_client(Path(args.state_dir))


def cmd_client_reset_ledger(args: argparse.Namespace) -> int:
    from fedguard.deploy.ledger_reset import reset_silo_ledger

    return reset_silo_ledger(Path(args.state_dir), args.reason, args.yes)


def cmd_run(args: argparse.Namespace) -> int:
    from fedguard.deploy.submit import submit_run

    return submit_run(Path(args.server_dir), Path(args.config), args.wait, args.timeout)


# -- handlers: audit / models --------------------------------------------------------------


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fedguard.deploy.records import verify_log

    key = Path(args.public_key) if args.public_key else None
    return verify_log(args.log, key, args.expect_head, args.silo)


def _registry_dir(args: argparse.Namespace) -> Path:
    if args.registry:
        return Path(args.registry)
    return ServerLayout(Path(args.server_dir)).registry


def cmd_models_list(args: argparse.Namespace) -> int:
    from fedguard.audit.registry import ModelRegistry
    from fedguard.deploy.records import list_models

    with ModelRegistry.open(_registry_dir(args)) as registry:
        list_models(registry, args.run)
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from fedguard.audit.registry import ModelRegistry
    from fedguard.deploy.records import show_model

    with ModelRegistry.open(_registry_dir(args)) as registry:
        show_model(registry, args.hash, args.run)
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from fedguard.audit.registry import ModelRegistry
    from fedguard.deploy.records import rollback_model

    with ModelRegistry.open(_registry_dir(args)) as registry:
        rollback_model(registry, args.hash, args.run, args.reason or "")
    return 0


# -- parsers -------------------------------------------------------------------------------


def add_deploy_commands(sub: Any) -> None:
    """Add ``ca``, ``node``, ``server``, ``client``, ``run``, ``audit``, ``models``;
    each leaf sets ``handler``."""
    _add_ca(sub)
    _add_node(sub)
    _add_server(sub)
    _add_client(sub)
    _add_run(sub)
    _add_audit(sub)
    _add_models(sub)


def _server_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server-dir",
        default="server",
        metavar="DIR",
        help="the consortium server's folder (certificate, keys, state) [default: server]",
    )


def _add_ca(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the consortium's certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    p = ca_sub.add_parser(
        "init", help="create the consortium CA", formatter_class=_FMT,
        description="Create a self-signed consortium CA (ECDSA P-384): DIR/ca.crt, DIR/ca.key.",
    )  # fmt: skip
    p.add_argument("--dir", default="ca", help="folder for ca.crt and ca.key")
    p.add_argument("--name", default="fedguard consortium CA", help="the CA's common name")
    p.add_argument("--days", type=int, default=3650, help="validity in days")
    p.add_argument("--force", action="store_true", help="overwrite existing key material")
    p.set_defaults(handler=cmd_ca_init)
    p = ca_sub.add_parser(
        "issue-server", help="issue the SuperLink's TLS certificate", formatter_class=_FMT,
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
    p.set_defaults(handler=cmd_ca_issue_server)
    _add_sign_roster(ca_sub)


def _add_sign_roster(ca_sub: Any) -> None:
    p = ca_sub.add_parser(
        "sign-roster",
        help="sign the silos' SecAgg identity keys (the roster)",
        formatter_class=_FMT,
        description="Sign the consortium's SecAgg roster: every silo id with its Ed25519 "
        "identity public key (secagg-identity.pub from `fedguard node keygen`), with the "
        "CA key (ECDSA P-384) or --key (an Ed25519 consortium key). Silos verify it "
        "against their own ca.crt; the server only relays it.",
    )
    p.add_argument("--ca-dir", default="ca", help="folder of ca.key and ca.crt")
    p.add_argument("--key", default=None, metavar="FILE", help="signing key [CA_DIR/ca.key]")
    p.add_argument(
        "--silo",
        action="append",
        default=[],
        metavar="SILO_ID=PUBLIC_KEY",
        help="a silo and its secagg-identity.pub (repeatable)",
    )
    p.add_argument(
        "--out", default=f"server/{ROSTER_FILE}", metavar="FILE", help="the signed roster"
    )
    p.add_argument(
        "--serial", type=int, default=None, help="roster serial [one more than --out's, or 1]"
    )
    p.add_argument("--consortium", default=None, help="consortium name [the CA's common name]")
    p.set_defaults(handler=cmd_ca_sign_roster)


def _add_node(sub: Any) -> None:
    node = sub.add_parser("node", help="silo node keys and registration")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    p = node_sub.add_parser(
        "keygen", help="make a silo's SuperNode key pair", formatter_class=_FMT,
        description="Make a SuperNode authentication key pair (ECDSA P-384, OpenSSH "
        "format, as Flower reads it): OUT/node.key (mode 0600) and OUT/node.pub, and the "
        "silo's SecAgg identity key (Ed25519, PEM): OUT/secagg-identity.key (0600) and "
        "OUT/secagg-identity.pub (for the consortium's roster).",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the key files")
    p.add_argument("--name", default="", help="comment written after the public key")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    p.set_defaults(handler=cmd_node_keygen)
    p = node_sub.add_parser(
        "register", help="allow a silo's key to join (flwr supernode register)",
        formatter_class=_FMT,
        description="Register a silo's public key with the running SuperLink "
        "(`flwr supernode register KEY.pub fedguard`). Only registered keys may join.",
    )  # fmt: skip
    p.add_argument("public_key", metavar="KEY.pub", help="the silo's node.pub")
    p.add_argument("--name", default="", help="a name for the node")
    _server_dir_arg(p)
    p.set_defaults(handler=cmd_node_register)
    p = node_sub.add_parser("list", help="list registered nodes (flwr supernode list)")
    _server_dir_arg(p)
    p.set_defaults(handler=cmd_node_list)


def _add_server(sub: Any) -> None:
    server = sub.add_parser("server", help="the consortium server (Flower SuperLink)")
    server_sub = server.add_subparsers(dest="server_command", required=True, metavar="COMMAND")
    p = server_sub.add_parser(
        "start", help="start the SuperLink with TLS and node authentication", formatter_class=_FMT,
        description="Start flower-superlink with the server folder's certificate, "
        "--enable-supernode-auth, --disable-runtime-dependency-installation and "
        "--database SERVER_DIR/superlink.db, in the background (PID in superlink.pid).",
    )  # fmt: skip
    _server_dir_arg(p)
    p.add_argument(
        "--address", default=DEFAULT_SERVER_ADDRESS, metavar="HOST:PORT",
        help="where the SuperLink listens (Fleet, Control and Runtime APIs share it)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait")
    p.add_argument(
        "--foreground", action="store_true", help="replace this process (for a service manager)"
    )
    p.set_defaults(handler=cmd_server_start)
    p = server_sub.add_parser("stop", help="stop the SuperLink started from --server-dir")
    _server_dir_arg(p)
    p.set_defaults(handler=cmd_server_stop)


def _add_client(sub: Any) -> None:
    client = sub.add_parser("client", help="a silo's agent (Flower SuperNode)")
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    _add_client_start(client_sub)
    p = client_sub.add_parser("stop", help="stop the SuperNode started for --state-dir")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.set_defaults(handler=cmd_client_stop)
    p = client_sub.add_parser(
        "reset-ledger",
        help="start this silo's privacy budget afresh (archived, logged; silo stopped)",
    )
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--reason", required=True, help="why (written to the silo's signed log)")
    p.add_argument("--yes", action="store_true", help="confirm the reset")
    p.set_defaults(handler=cmd_client_reset_ledger)


def _add_client_start(client_sub: Any) -> None:
    defaults = RunConfig()
    p = client_sub.add_parser(
        "start", help="start this silo's SuperNode", formatter_class=_FMT,
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
    p.add_argument(
        "--secagg-identity", default=None, metavar="FILE",
        help="this silo's Ed25519 SecAgg identity key [secagg-identity.key beside --key]",
    )  # fmt: skip
    p.add_argument(
        "--consortium-key", default=None, metavar="FILE",
        help="the key the SecAgg roster must be signed with [--ca-cert]",
    )  # fmt: skip
    p.add_argument("--silo-id", default=None, help="[default: the state folder's name]")
    p.add_argument(
        "--dataset", default=defaults.dataset.value, choices=[d.value for d in DatasetName],
        help="a built-in data set (ignored with --contract)",
    )  # fmt: skip
    p.add_argument(
        "--contract", default=None, metavar="FILE",
        help="this silo's copy of the consortium's data contract (TOML)",
    )  # fmt: skip
    p.add_argument(
        "--model-factory", default=None, metavar="MODULE:FUNCTION",
        help="the consortium's own torch model, from this silo's installation",
    )  # fmt: skip
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
    p.add_argument("--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait")
    p.add_argument("--foreground", action="store_true", help="stay until the SuperNode exits")
    p.set_defaults(handler=cmd_client_start)


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="start a federated run on the SuperLink (flwr run)", formatter_class=_FMT,
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
    p.set_defaults(handler=cmd_run)


def _add_audit(sub: Any) -> None:
    audit = sub.add_parser("audit", help="verify audit logs")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = audit_sub.add_parser(
        "verify", help="verify an audit log's chain and signatures", formatter_class=_FMT,
        description="Recompute every record's hash and signature and check the chain; "
        "exit 0 if intact, 1 naming the first bad record.",
    )  # fmt: skip
    p.add_argument("log", metavar="LOG")
    p.add_argument("--public-key", default=None, metavar="KEY", help="audit.pub (or node.pub)")
    p.add_argument("--expect-head", default=None, metavar="SEQ:SHA256", help="a known head")
    p.add_argument("--silo", action="store_true", help="LOG is a silo's silo-log.jsonl")
    p.set_defaults(handler=cmd_audit_verify)


_MODELS_COMMANDS: tuple[tuple[str, str, Handler], ...] = (
    ("list", "list registered models (* marks a run's head)", cmd_models_list),
    ("show", "show one model, its config, metrics and lineage", cmd_models_show),
    ("rollback", "make a model its run's head again (recorded)", cmd_models_rollback),
)


def _add_models(sub: Any) -> None:
    models = sub.add_parser("models", help="the model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    for name, text, handler in _MODELS_COMMANDS:
        p = models_sub.add_parser(name, help=text)
        if name != "list":
            p.add_argument("hash", metavar="HASH", help="a model hash or a prefix (>= 4 digits)")
        p.add_argument("--run", default=None, help="only this run")
        if name == "rollback":
            p.add_argument("--reason", default="", help="why (kept in the registry)")
        _server_dir_arg(p)
        p.add_argument("--registry", default=None, metavar="DIR", help="[SERVER_DIR/registry]")
        p.set_defaults(handler=handler)
