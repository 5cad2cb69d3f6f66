"""``fedguard server start|stop``: the consortium's SuperLink (``flower-superlink``)."""

from __future__ import annotations

import os
from pathlib import Path

from fedguard.deploy.errors import DeploymentError
from fedguard.deploy.layouts import SERVER_DIR_ENV, ServerLayout, parse_address, write_connection
from fedguard.deploy.supervision import (
    environment,
    flower_tool,
    lock_folder,
    spawn,
    stop_holders,
    stop_pid,
    wait_for_port,
    write_pid,
)

__all__ = ["DEFAULT_SERVER_ADDRESS", "start_superlink", "stop_superlink", "superlink_command"]

DEFAULT_SERVER_ADDRESS = "127.0.0.1:9092"


def superlink_command(layout: ServerLayout, address: str) -> list[str]:
    """``flower-superlink`` with TLS, node authentication, no dependency installation
    and its database in the server folder."""
    host, port = parse_address(address)
    for path in (layout.ca_cert, layout.cert, layout.key):
        if not path.exists():
            raise DeploymentError(
                f"{path} is missing; run `fedguard ca issue-server --out {layout.root}` first"
            )
    return [
        flower_tool("flower-superlink"),
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


def start_superlink(server_dir: Path, address: str, timeout: float, foreground: bool) -> int:
    """Start the SuperLink of ``server_dir`` in the background (or in place, ``foreground``)."""
    layout = ServerLayout(server_dir.resolve())
    if not layout.root.is_dir():
        raise DeploymentError(
            f"{layout.root} is not a server folder; run `fedguard ca issue-server --out "
            f"{layout.root}` first"
        )
    # The lock first: a second start fails here, before it checks, spawns or writes.
    with lock_folder(layout.lock_file, "a SuperLink") as lock:
        command = superlink_command(layout, address)
        write_connection(layout, address)
        env = environment(layout.flwr_home, {SERVER_DIR_ENV: str(layout.root)})
        if foreground:
            write_pid(layout.pid_file, os.getpid())  # exec keeps the PID and the lock
            lock.inheritable()
            os.execve(command[0], command, env)
        pid = spawn(command, layout.log_file, env, layout.root, lock)
        lock.record(pid)
        write_pid(layout.pid_file, pid)
        host, port = parse_address(address)
        try:
            wait_for_port(host, port, pid, layout.log_file, timeout)
        except BaseException:
            stop_pid(pid, "flower-superlink", timeout=5.0)
            layout.pid_file.unlink(missing_ok=True)
            raise
    print(f"SuperLink PID {pid} on {address} (TLS, node authentication)")
    print(f"  log: {layout.log_file}\n  state: {layout.database}")
    return 0


def stop_superlink(server_dir: Path) -> int:
    """Stop the SuperLink that holds ``server_dir``'s lock (or its PID file's)."""
    layout = ServerLayout(server_dir.resolve())
    if not layout.root.is_dir():
        print(f"no SuperLink running from {layout.root}")
        return 0
    stopped = stop_holders(
        layout.lock_file,
        [(layout.pid_file, "flower-superlink", str(layout.database.resolve()))],
        "a SuperLink",
    )
    if not stopped:
        print(f"no SuperLink running from {layout.root}")
        return 0
    print(f"stopped {', '.join(stopped).replace('flower-superlink', 'SuperLink')}")
    return 0
