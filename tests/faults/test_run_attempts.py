"""One ServerApp per run, whatever Flower launches again (issue 13, chaos seed 62).

Flower's SuperExec launches again the ServerApp of a run whose task token expired
(one killed while starting, or one whose SuperLink was killed), about 30 s later,
beside the attempt ``fedguard run`` started afresh: two ServerApps wrote one run's
checkpoints and audit records at once. Two guards, each tested here:

* the ServerApp holds the run folder's lock (``serverapp.lock``) for its life and a
  second one stops before it reads or writes anything (before ``run-start``);
* ``fedguard run`` refuses a run whose ServerApp still runs, and stops the run's
  unfinished earlier Flower runs (attempts whose ServerApp is gone) before it
  submits, so Flower has nothing left to launch again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, cast

import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid

from fedguard.core.process_lock import ProcessLock, lock_holder, lock_is_held
from fedguard.deploy.flower_control import (
    SuperLinkUnreachableError,
    control_client,
    run_status,
    wait_for_run,
)
from fedguard.deploy.layouts import SERVER_DIR_ENV, ServerLayout, write_connection
from fedguard.deploy.run_lock import RUN_LOCK, RunActiveError
from tests.faults.test_locks import deployment
from tests.integration.deployment_harness import write_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier


class _NoGrid:
    """A Grid the refused ServerApp must never use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the second ServerApp used the grid ({name})")


def test_a_second_serverapp_of_a_run_stops_before_run_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedguard.apps import server as app
    from fedguard.audit.pki import audit_keygen

    server = tmp_path / "server"
    audit_keygen(server)
    monkeypatch.setenv(SERVER_DIR_ENV, str(server))
    run_dir = tmp_path / "runs" / "nightly"
    first = ProcessLock.acquire(run_dir / RUN_LOCK, "the first ServerApp")  # it runs the run
    context = Context(
        run_id=7,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"run-name": "nightly", "out": str(tmp_path / "runs"), "clients": 3},
    )
    with first, pytest.raises(RunActiveError) as refused:
        app._deployed_main(cast(Grid, _NoGrid()), context)
    assert f"PID {os.getpid()} holds the lock" in str(refused.value)
    assert "Flower run 7" in str(refused.value)
    audit = ServerLayout(server).audit_log
    assert not audit.exists() or "run-start" not in audit.read_text()
    assert not (run_dir / "checkpoints").exists()


def test_run_wait_on_a_superlink_that_is_down_is_a_typed_error(tmp_path: Path) -> None:
    from fedguard.audit.pki import init_ca, issue_server_cert

    init_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "server")
    layout = ServerLayout(tmp_path / "server")
    write_connection(layout, "127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(SuperLinkUnreachableError, match=r"cannot reach the SuperLink at 127"):
        wait_for_run(layout, "1", timeout=5)


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_run_refuses_a_live_attempt_and_stops_a_dead_one(tmp_path: Path) -> None:
    # A SuperLink and no silos: the run's ServerApp starts and waits for silos.
    with deployment(tmp_path, keys=[]) as d:
        layout = ServerLayout(tmp_path / "server")
        config = write_config(tmp_path, "nightly", rounds=1)
        lock = layout.runs / "nightly" / RUN_LOCK
        first = d.fedguard("run", str(config), "--server-dir", "server")
        first_run = first.stdout.split("Flower run ")[1].split()[0]
        _wait(lambda: lock_is_held(lock), 120, "the first ServerApp holds the run's lock")
        serverapp = lock_holder(lock)
        assert serverapp is not None

        # While its ServerApp runs, the run is not started again.
        again = d.fedguard("run", str(config), "--server-dir", "server", check=False)
        assert again.returncode != 0
        assert f"run nightly is running (its ServerApp, PID {serverapp}" in again.stderr

        # Killed, its Flower run is left unfinished: Flower would launch it again.
        os.kill(serverapp, signal.SIGKILL)
        _wait(lambda: not lock_is_held(lock), 30, "the killed ServerApp's lock is free")
        with control_client(layout) as client:
            assert not run_status(client, first_run)[0].startswith("finished")
        resumed = d.fedguard("run", str(config), "--server-dir", "server")
        assert f"stopped Flower run {first_run}, an earlier attempt" in resumed.stdout
        with control_client(layout) as client:
            assert run_status(client, first_run)[0] == "finished:stopped"
        _wait(lambda: lock_is_held(lock), 120, "the new attempt's ServerApp holds the lock")
        assert lock_holder(lock) != serverapp
