"""``fedguard run CONFIG``: submit a fedguard run to the SuperLink (``flwr run``) and,
with ``--wait``, follow it to its ``run-end`` in the audit log."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedguard.core.config import RunConfig
from fedguard.core.errors import ConfigError
from fedguard.deploy.bundles import toml_value, write_app
from fedguard.deploy.errors import DeploymentError
from fedguard.deploy.flower_control import flower_json, stop_unfinished_attempts, wait_for_run
from fedguard.deploy.layouts import CONNECTION, ServerLayout
from fedguard.deploy.run_lock import refuse_active_run
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.runs.layout import VariantFolder

__all__ = [
    "EXIT_NOT_AS_PLANNED",
    "run_end_record",
    "run_exit_status",
    "run_options",
    "submit_run",
]

#: ``fedguard run --wait`` exit statuses: the run finished, but not as planned
#: (``degraded``, or ``stopped`` on the central DP budget); any other failure is 1.
EXIT_NOT_AS_PLANNED = 3


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


def _start_run(layout: ServerLayout, options: Mapping[str, Any]) -> tuple[str, int]:
    """Submit the run once it may start: its Flower run id, and the audit log's last
    sequence number before it (its ``run-end`` comes after that)."""
    from fedguard.server.secure_round import check_dropout_tolerance

    check_dropout_tolerance(RunConfig.from_options(options))  # before anything starts
    run_name = str(options["run-name"])
    refuse_active_run(Path(str(options["out"])) / run_name, run_name)
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
    answer = flower_json(
        ["run", str(app), CONNECTION, "--run-config", f"run-name={toml_value(run_name)}"],
        layout.flwr_home,
    )
    return str(answer.get("run-id")), logged_before


def submit_run(server_dir: Path, config_file: Path, wait: bool, timeout: float) -> int:
    """``fedguard run``: 0 once submitted; with ``wait``, :func:`run_exit_status`."""
    layout = ServerLayout(server_dir.resolve())
    if not (layout.flwr_home / "config.toml").exists():
        raise DeploymentError(f"no SuperLink connection in {layout.flwr_home}; start the server")
    options = run_options(config_file, layout)
    run_name = str(options["run-name"])
    run_dir = Path(str(options["out"])) / run_name
    flower_run, logged_before = _start_run(layout, options)
    print(f"run {run_name}: Flower run {flower_run} started")
    print(f"  run folder: {run_dir}")
    done = CheckpointStore(VariantFolder(run_dir).checkpoints).rounds()
    if done:
        print(f"  checkpoints up to round-{done[-1]:04d}: the run resumes after that round")
    if not wait:
        return 0
    status, details = wait_for_run(layout, flower_run, timeout)
    end = run_end_record(layout, run_name, logged_before)
    print(f"run {run_name}: {status}" + (f" ({details})" if details else ""))
    if end is None:
        print(f"run {run_name}: no run-end in {layout.audit_log}: it ended without a final record")
    else:
        reasons = [str(r) for r in end.get("reasons") or []]
        print(f"run {run_name}: {end.get('status')}" + "".join(f"\n  {r}" for r in reasons))
    return run_exit_status(status, end)


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
    from fedguard.audit.chain import AuditError, read_records

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
    from fedguard.audit.chain import AuditError, read_records

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
