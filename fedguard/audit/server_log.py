"""The consortium server's audit log: append-only, hash-chained, Ed25519-signed.

:class:`AuditLog` records every run and round (kinds ``run-start``, ``round``,
``run-end``), each record signed with the server's Ed25519 audit key
(``audit.key``, made by ``fedguard ca issue-server``). The record format, the
chaining and what verification catches are those of :mod:`fedguard.audit.chain`;
appending and the torn-write repair are :mod:`fedguard.audit.logs`', shared with
each silo's own log (:class:`~fedguard.audit.logs.SiloLog`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.audit.chain import AuditError, AuditRecord, VerificationReport, _verify_log
from fedguard.audit.logs import _ChainedLog
from fedguard.audit.pki import VerifyingKey

__all__ = [
    "AuditKind",
    "AuditLog",
    "package_versions",
    "verify_audit_log",
]

_PACKAGES = ("fedguard", "flwr", "torch", "opacus", "dp-accounting", "numpy", "cryptography")


class AuditKind(StrEnum):
    """What the server's audit log records."""

    RUN_START = "run-start"
    ROUND = "round"
    RUN_END = "run-end"
    LOG_REPAIRED = "log-repaired"


def _count(value: object) -> int | None:
    """A count a silo reported as a float metric (None when it sent none)."""
    return int(value) if isinstance(value, (int, float)) else None


def _silo_ids(outcomes: list[Any], *statuses: str) -> list[str]:
    """The silos whose outcome has one of ``statuses``."""
    return [str(o["silo_id"]) for o in outcomes if o["status"] in statuses]


def _reasons(outcomes: list[Any], *statuses: str) -> list[dict[str, str]]:
    """Each silo with one of ``statuses``: its status, its reason and the stage it stopped at."""
    return [
        {
            "silo": str(o["silo_id"]),
            "status": str(o["status"]),
            "reason": str(o["reason"]),
            **({"stage": str(o["stage"])} if o.get("stage") else {}),
        }
        for o in outcomes
        if o["status"] in statuses
    ]


def _silo_entry(o: Mapping[str, Any]) -> dict[str, Any]:
    """One sampled silo's line of a ``round`` record (see :meth:`AuditLog.record_round`)."""
    metrics = o.get("metrics") or {}
    return {
        "silo": str(o["silo_id"]),
        "status": str(o["status"]),
        "stage": str(o.get("stage", "")),
        "reason": str(o.get("reason", "")),
        "epsilon": metrics.get("epsilon-spent"),
        # A silo's explicit fresh starts: its ε above is since the last one.
        "ledger_resets": _count(metrics.get("ledger-resets")),
        "epsilon_archived": metrics.get("epsilon-archived"),
        "released": o.get("released"),
        "charge": str(o.get("charge", "unknown")),
    }


_COVERAGE = ("num_examples", "loss", "accuracy", "auc", "secure", "covered", "missing")


def _evaluation(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The pooled evaluation with its coverage, and why it failed if it did."""
    return {
        **{k: evaluation.get(k) for k in _COVERAGE},
        **({"failed": evaluation["failed"]} if evaluation.get("failed") else {}),
    }


def package_versions() -> dict[str, str]:
    """Versions of the packages a run's result depends on (for ``run-start``)."""
    out: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def verify_audit_log(
    path: Path,
    public_key: VerifyingKey,
    *,
    expected_head: tuple[int, str] | None = None,
    check_head_file: bool = True,
) -> VerificationReport:
    """Verify a server audit log: every record signed by ``public_key`` and chained."""
    return _verify_log(
        path,
        public_key,
        require_signatures=True,
        allowed_kinds=frozenset(AuditKind),
        expected_head=expected_head,
        check_head_file=check_head_file,
    )


class AuditLog(_ChainedLog):
    """The server's audit log: every record signed with the server's Ed25519 key."""

    _kinds = AuditKind
    _repair_kind = AuditKind.LOG_REPAIRED.value

    @classmethod
    def open(cls, path: Path, signing_key: ed25519.Ed25519PrivateKey) -> AuditLog:
        """Open (or create) ``path``; refuse a log that does not verify with the key."""
        if not isinstance(signing_key, ed25519.Ed25519PrivateKey):
            raise AuditError(
                f"the server audit log is signed with an Ed25519 key, "
                f"got {type(signing_key).__name__}"
            )
        return cls._open(path, signing_key)

    def run_start(self, run_id: str, config: Mapping[str, Any], **extra: Any) -> AuditRecord:
        """``run-start``: the run id, its full config (option names) and package versions."""
        return self.append(
            AuditKind.RUN_START,
            {"run_id": run_id, "config": config, "packages": package_versions(), **extra},
        )

    def round(self, run_id: str, round_number: int, **fields: Any) -> AuditRecord:
        """``round``: see the audit log's payload schema in docs/deployment.md."""
        return self.append(AuditKind.ROUND, {"run_id": run_id, "round": round_number, **fields})

    def record_round(
        self,
        run_id: str,
        record: Mapping[str, Any],
        *,
        model_sha256: str,
        parent_sha256: str | None = None,
        update_sha256: Mapping[str, str] | None = None,
    ) -> AuditRecord:
        """``round`` from the orchestrator's ``RoundRecord.to_dict()``, written once.

        ``silos`` lists every sampled silo with its status (``ok``, ``refused``,
        ``error``, ``no-reply``, ``rejected``, ``dropout``, ``aborted``), the SecAgg
        stage it stopped at, the reason, the ε it reported for the round (its
        lifetime ε after this round's charge, None if it reported none), whether
        the server received a release from it and what it paid (``charge``:
        ``charged``, ``nothing``, ``unknown``). The same silos are sorted into
        participating (``ok``), refusing (``refused``), rejected and dropouts
        (``no-reply``, ``error``, ``dropout``, ``aborted``), each with its reason;
        ``charged_nothing`` names the silos that released nothing this round.
        ``failure`` says why the round left the model unchanged ("" if it did
        not), ``contributors`` how many silos' updates the aggregate holds, and
        ``evaluation`` the pooled metrics with their coverage (``covered`` silos,
        ``missing`` ones with why, ``num_examples`` covered). If this run's round
        is already in the log (a resumed server replays the round it was
        checkpointing), returns that record.
        """
        round_number = int(record["round"])
        existing = self.find(AuditKind.ROUND, run_id, round_number)
        if existing is not None:
            return existing
        outcomes = list(record.get("outcomes", []))
        return self.round(
            run_id,
            round_number,
            sampled=[str(o["silo_id"]) for o in outcomes],
            silos=[_silo_entry(o) for o in outcomes],
            participating=_silo_ids(outcomes, "ok"),
            refusing=_reasons(outcomes, "refused"),
            rejected=_reasons(outcomes, "rejected"),
            dropouts=_reasons(outcomes, "no-reply", "error", "dropout", "aborted"),
            failure=str(record.get("failure", "")),
            contributors=record.get("contributors"),
            aggregation=record.get("aggregation", {}),
            epsilon=record.get("silo_epsilon", {}),
            charged_nothing=[str(o["silo_id"]) for o in outcomes if o.get("charge") == "nothing"],
            central_epsilon=record.get("central_epsilon"),
            evaluation=_evaluation(record.get("evaluation") or {}),
            model_sha256=model_sha256,
            parent_sha256=parent_sha256,
            update_sha256=dict(update_sha256 or {}),
        )

    def run_end(self, run_id: str, status: str, **fields: Any) -> AuditRecord:
        """``run-end``: how the run ended and its last model.

        ``status`` is a :class:`~fedguard.server.round_records.RunStatus` value
        (``completed``, ``degraded``, ``failed``, ``stopped``, ``killed``) with the
        ``reasons`` in the fields.
        """
        return self.append(AuditKind.RUN_END, {"run_id": run_id, "status": status, **fields})

    def unfinished_runs(self) -> list[AuditRecord]:
        """Every ``run-start`` that no later ``run-end`` of its run closes, oldest first.

        A ``run-end`` closes every earlier open start of the same run (a resumed
        run that ended closes the start of the process that died before it).
        """
        open_starts: list[AuditRecord] = []
        for record in self.records():
            if record.kind == AuditKind.RUN_START:
                open_starts.append(record)
            elif record.kind == AuditKind.RUN_END:
                run_id = record.payload.get("run_id")
                open_starts = [s for s in open_starts if s.payload.get("run_id") != run_id]
        return open_starts
