"""The silo's ledger, bound to its own signed silo log and checked on every open.

Why: the ledger is one SQLite file; deleting it, restoring an older copy or
putting another silo's ledger in its place would hand the silo a fresh budget.
The silo log (``silo-log.jsonl``, hash-chained and signed with the node key, in
the same state folder) therefore commits to the ledger:

* ``ledger`` records (:data:`~fedguard.audit.logs.SiloKind.LEDGER`) with
  ``event`` ``created`` (a new ledger), ``bound`` (a ledger written by an older
  fedguard, adopted once), ``charged`` (after every charge, before anything
  derived from it leaves the silo) or ``reset`` (an explicit, logged fresh
  start: :func:`reset_ledger`); each names the ledger's random ``ledger_id``,
  its number of charges ``entries``, the head of its hash chain of charges
  ``head`` (:func:`fedguard.privacy.ledger.chain_head`) and the ``epsilon``
  after it;
* ``sent`` records, with the ε after every reply.

Every open (:func:`open_silo_ledger`, before any training or release, and
``fedguard client start`` before it connects, :func:`verify_silo_state`) checks
both ways:

* a log that names a ledger (or records any spend) beside a missing ledger;
* a ledger with another id than the log's last ``ledger`` record (replaced or
  foreign), fewer charges than the log committed to (rolled back), or another
  history at that point (a different head);
* a ledger spending less than the largest ε the log records;
* a ledger holding charges beside a missing or empty log;

each raises :class:`LedgerIntegrityError` saying what to do, before anything is
charged. A ledger *ahead* of its log (a charge committed, then the process died
before the log record) is the one safe difference (it can only over-count): the
missing ``charged`` records are appended on open, marked ``catch_up``.

Not covered: deleting the ledger *and* the silo log together (then nothing on
the silo remembers); only an outside anchor shows that — the server's audit log
holds each silo's ε per round.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from fedguard.audit.chain import AuditRecord, read_records
from fedguard.audit.logs import SILO_LOG_NAME, SiloKind, SiloLog
from fedguard.audit.pki import load_private_key
from fedguard.client.silo import SiloSettings
from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import FedguardError, LedgerError
from fedguard.privacy.ledger import LedgerEntry, LedgerHead, PrivacyLedger

__all__ = [
    "LedgerIntegrityError",
    "LedgerOwner",
    "LedgerResets",
    "ledger_resets",
    "logged_epsilon",
    "open_silo_ledger",
    "record_charge",
    "reset_ledger",
    "verify_silo_state",
]


class LedgerOwner(Protocol):
    """What the guard needs of a silo: its id, state folder, budget and log key.

    :class:`~fedguard.client.silo.SiloSettings` is one; a silo's side of federated
    distillation (:class:`fedguard.edge.distill.DistillSilo`) is another, so every
    charge of a silo, whatever the job, goes through the same checks and log.
    """

    @property
    def silo_id(self) -> str: ...

    @property
    def state_dir(self) -> Path: ...

    @property
    def budget(self) -> PrivacyBudget: ...

    @property
    def signing_key(self) -> Path | None: ...


#: Float slack between the ε the ledger computes and the one the log copied.
_TOLERANCE = 1e-9
_ARCHIVE = "archive"


class LedgerIntegrityError(LedgerError):
    """The ledger and the silo's own log disagree (lost, rolled back, replaced, foreign)."""


def _log_records(state_dir: Path) -> list[AuditRecord]:
    path = Path(state_dir) / SILO_LOG_NAME
    if not path.exists() and not path.is_symlink():
        return []
    try:
        return read_records(path)
    except (FedguardError, OSError) as unreadable:
        raise LedgerIntegrityError(
            f"the silo log {path} cannot be read ({unreadable}); the ledger cannot be "
            "checked against it, so nothing is charged"
        ) from None


def _current(records: Sequence[AuditRecord]) -> list[AuditRecord]:
    """The records since the last explicit reset (all of them without one)."""
    start = 0
    for index, record in enumerate(records):
        if record.kind == SiloKind.LEDGER.value and record.payload.get("event") == "reset":
            start = index
    return list(records[start:])


def _max_epsilon(records: Sequence[AuditRecord]) -> float:
    spent = [
        float(r.payload["epsilon"])
        for r in records
        if r.kind in (SiloKind.SENT.value, SiloKind.LEDGER.value)
        and isinstance(r.payload.get("epsilon"), (int, float))
        and not (r.kind == SiloKind.LEDGER.value and r.payload.get("event") == "reset")
    ]
    return max(spent, default=0.0)


@dataclasses.dataclass(frozen=True)
class LedgerResets:
    """The silo's explicit fresh starts, as its signed log records them.

    ``count``: ``reset`` records in the log; ``archived_epsilon``: the lifetime ε
    of the ledgers those resets archived. Both go with every reply that reports
    ``epsilon-spent`` (``ledger-resets``, ``epsilon-archived``), so the consortium
    sees a reset in the audit log: a silo's ε since its last reset is not its
    lifetime spend.
    """

    count: int
    archived_epsilon: float


def ledger_resets(state_dir: Path) -> LedgerResets:
    """The resets the silo log in ``state_dir`` records (none without a log)."""
    resets = [
        r.payload
        for r in _log_records(state_dir)
        if r.kind == SiloKind.LEDGER.value and r.payload.get("event") == "reset"
    ]
    archived = sum(
        float(r["previous_epsilon"])
        for r in resets
        if isinstance(r.get("previous_epsilon"), (int, float))
    )
    return LedgerResets(len(resets), archived)


def logged_epsilon(state_dir: Path) -> float:
    """The largest ε the silo log records since its last reset (0 without a log)."""
    return _max_epsilon(_current(_log_records(state_dir)))


def _open_log(settings: LedgerOwner) -> SiloLog:
    key = None if settings.signing_key is None else load_private_key(settings.signing_key)
    return SiloLog.open(Path(settings.state_dir), key)


def _head_fields(head: LedgerHead, epsilon: float) -> dict[str, Any]:
    return {
        "ledger_id": head.ledger_id,
        "entries": head.entries,
        "head": head.head,
        "epsilon": epsilon,
    }


def _refuse(settings: LedgerOwner, problem: str, remedy: str) -> LedgerIntegrityError:
    return LedgerIntegrityError(
        f"silo {settings.silo_id}: {problem}. {remedy}; nothing was charged or trained"
    )


_RESTORE = (
    "Restore the silo's current ledger file; to start afresh deliberately, run "
    "`fedguard client reset-ledger` (logged, seen by the consortium)"
)


def open_silo_ledger(settings: LedgerOwner) -> PrivacyLedger:
    """Open the silo's ledger after checking it against the silo's own log (see above)."""
    state_dir = Path(settings.state_dir)
    records = _current(_log_records(state_dir))
    ledger_path = state_dir / PrivacyLedger.FILENAME
    logged = _max_epsilon(records)
    bindings = [r for r in records if r.kind == SiloKind.LEDGER.value]
    if not ledger_path.exists():
        if logged > 0 or bindings:
            raise _refuse(
                settings,
                f"its signed log records ε={logged:.6g} spent (ledger "
                f"{bindings[-1].payload.get('ledger_id') if bindings else 'unnamed'}), but the "
                f"privacy ledger {ledger_path} is missing; a new ledger would restart the budget",
                _RESTORE,
            )
        ledger = PrivacyLedger.open(state_dir, settings.silo_id, settings.budget)
        try:
            _open_log(settings).ledger("created", **_head_fields(ledger.head(), 0.0))
            ledger.mark_bound_to_log()
        except BaseException:
            ledger.close()
            raise
        return ledger
    ledger = PrivacyLedger.open(state_dir, settings.silo_id, settings.budget)
    try:
        _check(settings, ledger, records, bindings, logged)
    except BaseException:
        ledger.close()
        raise
    return ledger


def _check(
    settings: LedgerOwner,
    ledger: PrivacyLedger,
    records: Sequence[AuditRecord],
    bindings: Sequence[AuditRecord],
    logged: float,
) -> None:
    head = ledger.head()
    entries = ledger.entries()
    spent = ledger.spent_epsilon()
    path = ledger.path
    if not bindings:
        # Only a ledger no log ever committed to (just created, or written by an older
        # fedguard) is adopted; one that was bound has lost the log that vouched for it.
        if ledger.bound_to_log() or (not records and head.entries > 0):
            raise _refuse(
                settings,
                f"the ledger {path} holds {head.entries} charges but the silo log "
                f"{SILO_LOG_NAME} that vouched for it is missing or was replaced",
                "Restore the silo log",
            )
    else:
        last = bindings[-1].payload
        committed = int(last.get("entries", -1))
        if last.get("ledger_id") != head.ledger_id:
            raise _refuse(
                settings,
                f"the ledger {path} is ledger {head.ledger_id}, but the silo log is bound to "
                f"ledger {last.get('ledger_id')}: it was replaced (another silo's, or a "
                "fresh file)",
                _RESTORE,
            )
        if not 0 <= committed <= head.entries:
            raise _refuse(
                settings,
                f"the silo log committed to {committed} charges, the ledger {path} holds "
                f"{head.entries}: charges were lost or an older copy was restored",
                _RESTORE,
            )
        if head.heads[committed] != last.get("head"):
            raise _refuse(
                settings,
                f"the ledger {path}'s charge history differs from the one its silo log "
                f"committed to at charge {committed}: it was edited or replaced",
                _RESTORE,
            )
    if spent + _TOLERANCE < logged:
        raise _refuse(
            settings,
            f"its signed log records ε={logged:.6g} spent, but the ledger {path} holds "
            f"only ε={spent:.6g}: charges were lost or an older copy was restored",
            _RESTORE,
        )
    log = None
    if not bindings:
        log = _open_log(settings)
        log.ledger("bound" if records else "created", **_head_fields(head, spent))
        ledger.mark_bound_to_log()
        return
    committed = int(bindings[-1].payload["entries"])
    for index, entry in enumerate(entries[committed:], start=committed + 1):
        # Charged, then the process died before the log record: committed now.
        log = log or _open_log(settings)
        at = LedgerHead(head.ledger_id, head.heads[: index + 1])
        log.ledger(
            "charged",
            catch_up=True,
            **_charge_fields(entry),
            **_head_fields(at, entry.epsilon_after),
        )


def _charge_fields(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "run_id": entry.run_id,
        "round": entry.round,
        "purpose": entry.purpose.value,
        "entry_id": entry.entry_id,
    }


def record_charge(settings: LedgerOwner, ledger: PrivacyLedger, entry: LedgerEntry) -> None:
    """Commit a charge just made to the silo log, before what it paid for leaves.

    If this raises, the charge stays (it can only over-count) and the caller sends
    nothing; the next open appends the missing record.
    """
    _open_log(settings).ledger(
        "charged", **_charge_fields(entry), **_head_fields(ledger.head(), entry.epsilon_after)
    )


def reset_ledger(settings: SiloSettings, reason: str) -> Path | None:
    """Start the silo's budget afresh, deliberately and on the record.

    The current ledger (if any) is moved to ``<state-dir>/archive/``, a new ledger
    is created, and the silo log gets a ``reset`` record naming the old ledger,
    its head and lifetime ε, the new ledger and ``reason``. Returns the archived
    file. The old ledger must pass the usual checks first: a reset is a decision
    about a known history, not a way around a broken one.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise LedgerError("a ledger reset needs a reason (it is written to the silo log)")
    state_dir = Path(settings.state_dir)
    old_path = state_dir / PrivacyLedger.FILENAME
    previous: dict[str, Any] = {}
    archived: Path | None = None
    if old_path.exists():
        # The old ledger is checked under its own budget: a reset is also how a silo
        # moves to a new budget (the config already names the new one).
        old_settings = dataclasses.replace(settings, budget=PrivacyLedger.stored_budget(state_dir))
        with open_silo_ledger(old_settings) as old:
            head = old.head()
            previous = {
                "previous_ledger_id": head.ledger_id,
                "previous_entries": head.entries,
                "previous_head": head.head,
                "previous_epsilon": old.spent_epsilon(),
            }
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        archived = state_dir / _ARCHIVE / f"privacy-ledger-{stamp}-{head.ledger_id[:8]}.sqlite"
        archived.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(old_path), archived)
    ledger = PrivacyLedger.open(state_dir, settings.silo_id, settings.budget)
    with ledger:
        _open_log(settings).ledger(
            "reset", reason=reason.strip(), **previous, **_head_fields(ledger.head(), 0.0)
        )
        ledger.mark_bound_to_log()
    return archived


def verify_silo_state(settings: SiloSettings) -> float:
    """Check the silo's ledger and log before it connects; return its lifetime ε.

    What ``fedguard client start`` runs before it starts a SuperNode: the same
    checks as every training message (:func:`open_silo_ledger`), plus that the
    ledger file can be written. Raises :class:`LedgerIntegrityError` (or another
    :class:`~fedguard.core.errors.LedgerError`) naming what to do.
    """
    with open_silo_ledger(settings) as ledger:
        ledger.check_writable()
        return ledger.spent_epsilon()
