"""A warm ClientApp executor for a SuperNode in ``--isolation process`` mode.

Flower 1.41 runs every message a SuperNode receives in a new ``flwr-clientapp``
process, started by the SuperNode's own ``flower-superexec``. The new process
imports Flower, torch, Opacus and fedguard before it can train: about 4.5 s of
CPU on the machine we measured, paid by every silo for every message (two a
round). Flower has no long-lived ClientApp mode (``flwr-clientapp`` takes one
single-use ``--token``), but it lets an operator replace the SuperExec: with
``flower-supernode --isolation process`` the SuperNode only serves its Runtime
API, and any process may acquire tasks there.

This module is that process. It speaks Flower's own Runtime API with Flower's
own client (``AcquireTask``), and runs each task with Flower's own
``run_clientapp`` — in a fresh process per task, as Flower does, but forked from
a *fork server* (``multiprocessing`` ``forkserver`` context) that imported
torch, Opacus, Flower and fedguard once, at start. A task's process therefore
starts in milliseconds, and still dies after one message: nothing a task does
(memory, globals, a crash) reaches the next one. The fork server is
single-threaded, so forking it is safe; every child re-seeds Python's and
NumPy's global generators from the OS (a plain fork would share them; torch's
default generator starts from the same fixed seed in a fresh process anyway, and
fedguard seeds what it uses explicitly).

Two waits a fresh task process would otherwise pay are removed (both measured
with cProfile): the fork server also imports ``torch._dynamo``, which torch loads
lazily when the first optimizer is built (1.4 s per training task), and task
processes retry Flower's object pulls after 0.05 s instead of 1 s
(:func:`fedguard.wire.flower_runtime.fast_object_pulls`; the SuperNode creates a
task before it has fetched the message's objects, so a task that starts at once
finds them missing).

A second, fedguard-specific guard: the executor only runs FABs (Flower app
bundles) whose ``clientapp`` component is on an allow-list (by default
``fedguard.apps.silo:client_app``) and that ship no Python code. Flower would
otherwise run whatever code the SuperLink's operator sends; a hospital's agent
should run only the silo agent it installed.

Run it next to a SuperNode (``fedguard client start`` does both)::

    flower-supernode --isolation process --port 9094 ...
    python -m fedguard.client.executor --runtime-api-address 127.0.0.1:9094 \
        --parent-pid <SuperNode PID>
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import multiprocessing
import os
import random
import signal
import sys
import time
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import PurePosixPath
from typing import Any

from fedguard.core.errors import ConfigError, FedguardError
from fedguard.wire.flower_runtime import FAST_PULL_BACKOFF_S, fast_object_pulls

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLIENTAPP",
    "FAST_PULL_BACKOFF_S",
    "ExecutorConfig",
    "FabRejectedError",
    "WarmExecutor",
    "check_fab",
    "fast_object_pulls",
    "main",
]

DEFAULT_CLIENTAPP = "fedguard.apps.silo:client_app"

#: Imported once by the fork server, so a task's process does not import them again.
#: ``torch._dynamo``: torch imports it lazily when the first optimizer is built, which
#: cost 1.4 s of every training task in a fresh process (measured with cProfile).
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.optim",
    "torch.profiler",
    "opacus",
    "numpy",
    "flwr.supernode.runtime.run_clientapp",
    "fedguard.client.app",
)

# Files a FAB may carry besides its metadata: no code of any kind.
_CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".pyd", ".so", ".pth", ".dylib", ".dll"})


class FabRejectedError(FedguardError):
    """A run's app bundle is not one this silo agreed to run."""


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the SuperNode's Runtime API is and what the executor may run."""

    runtime_api_address: str
    parent_pid: int | None = None
    poll_interval: float = 0.1
    allowed_clientapps: tuple[str, ...] = field(default=(DEFAULT_CLIENTAPP,))

    def __post_init__(self) -> None:
        host, sep, port = self.runtime_api_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(
                f"runtime API address must be HOST:PORT, got {self.runtime_api_address!r}"
            )
        if not 0.01 <= self.poll_interval <= 60.0:
            raise ConfigError(f"poll interval must lie in [0.01, 60] s, got {self.poll_interval}")
        if not self.allowed_clientapps:
            raise ConfigError("at least one ClientApp reference must be allowed")
        if self.parent_pid is not None and self.parent_pid <= 0:
            raise ConfigError(f"parent PID must be > 0, got {self.parent_pid}")


def check_fab(fab: bytes, allowed_clientapps: Sequence[str]) -> str:
    """Return the FAB's ClientApp reference, or raise :class:`FabRejectedError`."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise FabRejectedError("the run's FAB is not a zip archive") from None
    with archive:
        names = archive.namelist()
        code = [n for n in names if PurePosixPath(n).suffix.lower() in _CODE_SUFFIXES]
        if code:
            raise FabRejectedError(f"the run's FAB ships code ({', '.join(sorted(code)[:5])})")
        if "pyproject.toml" not in names:
            raise FabRejectedError("the run's FAB has no pyproject.toml")
        try:
            config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
            reference = str(config["tool"]["flwr"]["app"]["components"]["clientapp"])
        except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as bad:
            raise FabRejectedError(f"the run's FAB has no readable clientapp: {bad}") from None
    if reference not in allowed_clientapps:
        raise FabRejectedError(
            f"the run asks for ClientApp {reference!r}; this silo only runs "
            f"{', '.join(allowed_clientapps)}"
        )
    return reference


def _run_task(address: str, token: str, allowed: tuple[str, ...], executor_pid: int) -> None:
    """Body of one task's process: Flower's ``run_clientapp`` with the FAB guard."""
    import numpy as np
    from flwr.supernode.runtime import run_clientapp as flower_runtime

    random.seed()
    np.random.seed()  # the legacy global generator, shared after a fork
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fast_object_pulls()
    original_install = getattr(flower_runtime, "install_from_fab")  # noqa: B009

    def guarded_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(fab_file, bytes):
            check_fab(fab_file, allowed)
        return original_install(fab_file, *args, **kwargs)

    setattr(flower_runtime, "install_from_fab", guarded_install)  # noqa: B010
    flower_runtime.run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=True,
        certificates=None,
        parent_pid=executor_pid,
        runtime_dependency_install=False,
    )


class WarmExecutor:
    """Acquire ClientApp tasks from a SuperNode and run each in a pre-warmed process."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(PRELOAD))
        self._children: list[tuple[BaseProcess, float]] = []
        self._stopping = False

    def _client(self) -> Any:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.config.runtime_api_address,
            insecure=True,  # the SuperNode's Runtime API listens on loopback only
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _reap(self) -> None:
        alive: list[tuple[BaseProcess, float]] = []
        for child, started in self._children:
            if child.is_alive():
                alive.append((child, started))
                continue
            child.join(0)
            seconds = time.monotonic() - started
            if child.exitcode:
                log.warning("task process %s exited with %s", child.pid, child.exitcode)
            else:
                log.info("task process %s done in %.2f s", child.pid, seconds)
        self._children = alive

    def _parent_alive(self) -> bool:
        pid = self.config.parent_pid
        if pid is None:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return os.getppid() == pid or _not_a_zombie(pid)

    def stop(self, *_: object) -> None:
        self._stopping = True

    def _stop_supernode(self) -> None:
        """The executor failed: stop its SuperNode too, rather than leave a node that
        takes messages nobody runs (the server would wait for its replies until its
        timeout). Stopped, the node leaves the federation at once and the round counts
        it as a dropout; a service manager restarts both."""
        pid = self.config.parent_pid
        if pid is not None and self._parent_alive():
            log.error("the warm executor failed; stopping its SuperNode (PID %s)", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def serve(self) -> int:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        # Start the fork server now, so the first task does not pay for the imports.
        self._context.Process(target=_noop).start()
        client = self._client()
        log.info("warm executor ready on %s", self.config.runtime_api_address)
        clean_exit = False
        try:
            while not self._stopping and self._parent_alive():
                self._reap()
                try:
                    response = client.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                    )
                except Exception as failed:  # the SuperNode restarting, a timeout
                    log.warning("acquiring a task failed: %s", failed)
                    time.sleep(1.0)
                    continue
                if response.HasField("task") and response.token:
                    child = self._context.Process(
                        target=_run_task,
                        args=(
                            self.config.runtime_api_address,
                            response.token,
                            self.config.allowed_clientapps,
                            os.getpid(),
                        ),
                    )
                    child.start()
                    self._children.append((child, time.monotonic()))
                    continue  # another task may be waiting
                time.sleep(self.config.poll_interval)
            clean_exit = True
        finally:
            client.close()
            if not clean_exit:
                self._stop_supernode()
            for running, _ in self._children:
                if running.is_alive() and running.pid is not None:
                    os.kill(running.pid, signal.SIGTERM)
            for running, _ in self._children:
                running.join(5.0)
        return 0


def _noop() -> None:
    return None


def _not_a_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedguard.client.executor",
        description="Run a SuperNode's ClientApp tasks in pre-warmed processes.",
    )
    p.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    p.add_argument("--poll-interval", type=float, default=0.1, metavar="SECONDS")
    p.add_argument(
        "--allow-clientapp",
        action="append",
        default=None,
        metavar="MODULE:ATTR",
        help=f"ClientApp references this silo runs [default: {DEFAULT_CLIENTAPP}]",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    args = _parser().parse_args(argv)
    try:
        config = ExecutorConfig(
            runtime_api_address=args.runtime_api_address,
            parent_pid=args.parent_pid,
            poll_interval=args.poll_interval,
            allowed_clientapps=tuple(args.allow_clientapp or (DEFAULT_CLIENTAPP,)),
        )
    except FedguardError as bad:
        print(f"fedguard executor: error: {bad}", file=sys.stderr)
        return 2
    return WarmExecutor(config).serve()


if __name__ == "__main__":
    sys.exit(main())
