"""Flower's own commands and Control API: ``flwr ...`` runs, the Control API client,
the runs a SuperLink knows (status, waiting for one, stopping unfinished attempts)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedguard.deploy.errors import DeploymentError
from fedguard.deploy.layouts import CONNECTION, ServerLayout
from fedguard.deploy.supervision import environment, flower_tool

__all__ = [
    "SuperLinkUnreachableError",
    "control_client",
    "flower_json",
    "list_nodes",
    "register_node",
    "run_flower",
    "run_status",
    "stop_unfinished_attempts",
    "wait_for_run",
]

#: How long ``fedguard run --wait`` keeps asking a SuperLink that stopped answering.
_UNREACHABLE_GRACE_S = 60.0

#: How many of the SuperLink's latest runs ``fedguard run`` looks through.
_LISTED_RUNS = 500


class SuperLinkUnreachableError(DeploymentError):
    """The SuperLink's Control API cannot be reached (not running, wrong address, down)."""


def run_flower(
    args: Sequence[str], flwr_home: Path, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS`` with ``FLWR_HOME`` at ``flwr_home``, its output captured."""
    try:
        return subprocess.run(
            [flower_tool("flwr"), *args],
            env=environment(flwr_home, {"NO_COLOR": "1", "COLUMNS": "200"}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeploymentError(
            f"`flwr {' '.join(args)}` did not finish in {timeout:.0f} s"
        ) from None


def flower_json(args: Sequence[str], flwr_home: Path) -> dict[str, Any]:
    """Run ``flwr ... --format json`` and return its JSON answer (or raise with its error)."""
    done = run_flower([*args, "--format", "json"], flwr_home)
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


def register_node(layout: ServerLayout, public_key: Path, name: str) -> dict[str, Any]:
    """``flwr supernode register KEY.pub fedguard [--name NAME]``: Flower's answer."""
    command = ["supernode", "register", str(public_key.resolve()), CONNECTION]
    if name:
        command += ["--name", name]
    return flower_json(command, layout.flwr_home)


def list_nodes(layout: ServerLayout) -> list[dict[str, Any]]:
    """``flwr supernode list fedguard``: the registered nodes."""
    answer = flower_json(["supernode", "list", CONNECTION], layout.flwr_home)
    return list(answer.get("nodes", []))


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
    expires. Stopped, it stays finished; :data:`~fedguard.deploy.run_lock.RUN_LOCK`
    covers the instant between.
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
