"""The deployed ServerApp's audit log and model registry: :class:`DeploymentRecorder`."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fedguard.deploy.layouts import ServerLayout
from fedguard.deploy.supervision import pid_alive
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.runs.layout import VariantFolder

if TYPE_CHECKING:
    from fedguard.audit.chain import AuditRecord
    from fedguard.audit.registry import ModelRegistry
    from fedguard.audit.server_log import AuditLog
    from fedguard.server.round_records import RoundRecord, RunOutcome

__all__ = ["DeploymentRecorder", "process_identity"]


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
        audit: AuditLog,
        registry: ModelRegistry,
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
        self.outcome: RunOutcome | None = None  # the run's outcome, from finish()

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

    def close_unfinished_runs(self) -> list[AuditRecord]:
        """``run-end`` ``killed`` for each earlier ``run-start`` whose process is gone."""
        from fedguard.server.round_records import RunStatus

        written = []
        for start in self.audit.unfinished_runs():
            process = start.payload.get("process") or {}
            if _process_alive(process):
                continue  # still running (another run on this SuperLink)
            run_id = str(start.payload.get("run_id"))
            written.append(
                self.audit.run_end(
                    run_id,
                    RunStatus.KILLED.value,
                    reasons=[self._killed_reason(start, run_id, process)],
                    run_start_seq=start.seq,
                    model_sha256=_head_sha256(self.registry, run_id),
                )
            )
        return written

    def _killed_reason(self, start: AuditRecord, run_id: str, process: Mapping[str, Any]) -> str:
        rounds = [
            r.payload.get("round")
            for r in self.audit.records()
            if r.kind == "round" and r.payload.get("run_id") == run_id and r.seq > start.seq
        ]
        what = f"ServerApp pid {process['pid']}" if "pid" in process else "its ServerApp"
        return (
            f"ended without a final record: {what} is gone (killed, or its machine "
            f"stopped); found when run {self.run_id} started"
            + (f"; last round recorded: {rounds[-1]}" if rounds else "; no round recorded")
        )

    def finish(self, outcome: RunOutcome | None) -> None:
        """The run's :class:`~fedguard.server.round_records.RunOutcome`, for ``run-end``."""
        self.outcome = outcome

    def __enter__(self) -> DeploymentRecorder:
        store = CheckpointStore(VariantFolder(self.run_dir).checkpoints)
        done = store.rounds()
        self.audit.run_start(
            self.run_id,
            self.config,
            resumed_after_round=done[-1] if done else None,
            process=process_identity(os.getpid()),
            **self.extra,
        )
        if done:
            history = store.load(done[-1]).state.get("history", [])
            by_round = {int(r["round"]): r for r in history}
            for number in done:
                if number in by_round:
                    self._record(by_round[number])
        return self

    def on_round(self, record: RoundRecord) -> None:
        """``FederatedRun``'s ``on_round``: register the round's model, audit the round."""
        self._record(record.to_dict())

    def _record(self, record: Mapping[str, Any]) -> None:
        number = int(record["round"])
        weights = CheckpointStore(VariantFolder(self.run_dir).checkpoints).load(number).weights()
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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fields: dict[str, Any]
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


def process_identity(pid: int) -> dict[str, Any]:
    """What ``run-start`` records of the ServerApp's process: pid, start time, host."""
    return {"pid": pid, "started": _process_start(pid), "host": socket.gethostname()}


def _process_alive(process: Mapping[str, Any]) -> bool:
    """Whether the process a ``run-start`` names still runs (another host: assumed so)."""
    pid = process.get("pid")
    if not isinstance(pid, int):
        return False  # a run-start from before processes were recorded
    if process.get("host") not in (None, socket.gethostname()):
        return True  # cannot tell from here
    if not pid_alive(pid):
        return False
    started = process.get("started")
    return started is None or _process_start(pid) in (None, started)


def _head_sha256(registry: ModelRegistry, run_id: str) -> str | None:
    try:
        head = registry.head(run_id)
    except Exception:  # the record is written even if the registry cannot say
        return None
    return getattr(head, "sha256", None)
