"""The persistent per-silo privacy ledger (SQLite, committed before every release).

A silo's sample-level (ε, δ) spend is the composition of the DP-SGD it actually
released, over every round it took part in, across every run of its life.
Selection by the server gives no amplification credit here: the server knows who
took part, so each round the silo releases is charged in full.

Besides DP-SGD rounds, a silo charges the statistics it releases to the trust
layer (fairness counts, drift histograms, attributions): each is a
:class:`~fedguard.privacy.events.GaussianRelease` charged under its
:class:`ChargePurpose` with the same rule, and the budget check composes every
charge, training and releases alike. A charge is identified by ``(run_id,
round, purpose)``; charging it twice raises ``LedgerError`` (a replayed round or
query is never released twice).

Charge at release (what the silo does each round, :mod:`fedguard.client.release`)::

    ledger.check_affordable(event, what)   # before training: refuse early, write nothing
    ... train / compute, keep what will be sent ...
    entry = ledger.charge(run_id, server_round, event)  # durable, right before it leaves
    ... record the charge in the silo log, send ...
    ledger.mark(entry.entry_id, ChargeStatus.COMPLETED)

``charge`` checks and inserts inside one ``BEGIN IMMEDIATE`` transaction (the
write lock is taken before the budget is read, so two processes sharing the file
cannot both pass the check) and commits with ``PRAGMA synchronous=EXTRA`` (FULL,
plus the directory sync that makes a rollback-journal commit survive a power
cut), so the charge is on disk before the release leaves the silo. If the
process dies after the charge the charge stays: a crash can only over-count,
never under-count. A round that ends before its release (a SecAgg abort before
the masked input, a training error) was never charged. Nothing is ever deleted;
status changes never reduce the spend.

The ledger's charges form a hash chain (:func:`chain_head`, starting from the
ledger's random ``ledger_id``); the silo's signed log commits to its head after
every charge, and :mod:`fedguard.client.ledger_guard` checks the two against
each other on every open.

File layout: ``<state_dir>/privacy-ledger.sqlite`` with ``PRAGMA application_id``
set to :data:`APPLICATION_ID`, a ``schema_version`` table (version
:data:`SCHEMA_VERSION`), a one-row ``silo`` table (silo id and budget, fixed at
creation; the ledger id; whether a silo log has committed to it), ``charges``
and ``plans``. Older schemas are migrated in place inside the opening
transaction: schema 1 (training charges only, unique per ``(run_id, round)``)
to 2 (a ``purpose`` column, unique per ``(run_id, round, purpose)``; every
schema-1 charge becomes a ``training`` charge with its entry id, event and
status kept), and 2 to 3 (a random ledger id, not yet bound to a log). Events
are stored as versioned JSON (see :mod:`fedguard.privacy.events`). The rollback
journal (not WAL) is used so the file also works on file systems without
shared memory.

The value types (entries, purposes, statuses, plans, heads, :func:`chain_head`)
are defined in :mod:`fedguard.privacy.ledger_records`, the schema and its
migrations in :mod:`fedguard.privacy.ledger_schema`; this module is the public
face of the ledger and exports them all.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedguard.core.checks import positive_int
from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import (
    BudgetExhaustedError,
    ConfigError,
    LedgerError,
    LedgerStorageError,
)
from fedguard.core.files import cause_name, describe_cause, storage_error
from fedguard.privacy.accountant import AccountantKind, PrivacyAccountant
from fedguard.privacy.events import DpSgdRound, GaussianRelease, event_from_json
from fedguard.privacy.ledger_records import (
    ChargePurpose,
    ChargeStatus,
    LedgerEntry,
    LedgerEvent,
    LedgerHead,
    RoundPlan,
    chain_head,
)
from fedguard.privacy.ledger_schema import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    create_or_check,
    utc_now,
)

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "ChargePurpose",
    "ChargeStatus",
    "LedgerEntry",
    "LedgerEvent",
    "LedgerHead",
    "PrivacyLedger",
    "RoundPlan",
    "chain_head",
]

_BUSY_TIMEOUT_S = 60.0

# Allowed status changes. Every status counts against the budget.
_TRANSITIONS: dict[ChargeStatus, frozenset[ChargeStatus]] = {
    ChargeStatus.CHARGED: frozenset(ChargeStatus),
    ChargeStatus.COMPLETED: frozenset({ChargeStatus.COMPLETED}),
    ChargeStatus.FAILED: frozenset({ChargeStatus.FAILED}),
}


class PrivacyLedger:
    """One silo's lifetime privacy spend, on disk. Open with :meth:`open`."""

    FILENAME = "privacy-ledger.sqlite"

    def __init__(
        self, path: Path, conn: sqlite3.Connection, silo_id: str, budget: PrivacyBudget
    ) -> None:
        # Private: use PrivacyLedger.open.
        self._path = path
        self._conn: sqlite3.Connection | None = conn
        self._silo_id = silo_id
        self._budget = budget
        self._lock = threading.RLock()
        self._spent_cache: tuple[tuple[int, int], float] | None = None

    # ----------------------------------------------------------------------- opening

    @classmethod
    def open(cls, state_dir: Path, silo_id: str, budget: PrivacyBudget) -> PrivacyLedger:
        """Open the silo's ledger in ``state_dir``, creating it on first use.

        Raises ``LedgerError`` if the file is not a fedguard ledger (naming the
        path), has an unknown schema version, or was created for another silo or
        another budget: a budget is fixed at creation and never changed silently;
        :class:`~fedguard.core.errors.LedgerStorageError` (a ``LedgerError``) if the
        file cannot be read or written (full disk, read-only, damaged page), naming
        the file and the cause. Every later read or write raises the same on a
        storage failure (:meth:`_transaction`), never a bare ``sqlite3`` error.
        """
        if not isinstance(silo_id, str) or not silo_id:
            raise ConfigError(f"silo_id must be a non-empty string, got {silo_id!r}")
        if not isinstance(budget, PrivacyBudget):
            raise ConfigError(f"budget must be a PrivacyBudget, got {budget!r}")
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(
                LedgerStorageError, "cannot create ledger directory", state_dir, exc
            ) from exc
        path = state_dir / cls.FILENAME
        try:
            conn = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise storage_error(
                LedgerStorageError, "cannot open privacy ledger", path, exc
            ) from exc
        try:
            # EXTRA = FULL (journal and database fsynced at every commit) plus an fsync
            # of the directory once the rollback journal is unlinked; with plain FULL a
            # power cut right after a commit can leave a hot journal behind that rolls
            # the charge back (sqlite.org/pragma.html#pragma_synchronous).
            conn.execute("PRAGMA synchronous=EXTRA")
            conn.execute("BEGIN IMMEDIATE")
            try:
                create_or_check(conn, path, silo_id, budget)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            conn.close()
            cause = cause_name(exc)
            what = (
                f"{path} is not a readable fedguard privacy ledger"
                if cause in _DAMAGED
                else f"cannot open privacy ledger {path}"
            )
            raise LedgerStorageError(
                f"{what}: {describe_cause(exc)}; nothing was charged", path=path, cause=cause
            ) from exc
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, silo_id, budget)

    @classmethod
    def stored_budget(cls, state_dir: Path) -> PrivacyBudget:
        """The budget the ledger in ``state_dir`` was created with, read without writing.

        What a deliberate reset needs: the old ledger is checked under its own budget
        before it is archived, whatever budget the silo's config now names.
        """
        path = Path(state_dir) / cls.FILENAME
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                rows = conn.execute("SELECT budget_epsilon, budget_delta FROM silo").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise LedgerStorageError(
                f"cannot read the budget of privacy ledger {path}: {describe_cause(exc)}",
                path=path,
                cause=cause_name(exc),
            ) from exc
        if len(rows) != 1:
            raise LedgerError(f"{path} is corrupt: {len(rows)} silo records")
        return PrivacyBudget(epsilon=float(rows[0][0]), delta=float(rows[0][1]))

    # ----------------------------------------------------------------------- plumbing

    @property
    def path(self) -> Path:
        return self._path

    @property
    def silo_id(self) -> str:
        return self._silo_id

    @property
    def budget(self) -> PrivacyBudget:
        return self._budget

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"privacy ledger {self._path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self, immediate: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; every ``sqlite3`` error in it is a ``LedgerStorageError``.

        That covers ``BEGIN``, every statement of the caller's ``with`` body (a full
        disk, a read-only file, a damaged page) and ``COMMIT``; the transaction is
        rolled back first, so nothing of it was written.
        """
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            except sqlite3.Error as exc:
                raise _storage_failure(self._path, exc, "cannot start a transaction") from exc
            try:
                yield conn
            except sqlite3.Error as exc:
                _rollback(conn)
                raise _storage_failure(self._path, exc, "read or write failed") from exc
            except BaseException:
                _rollback(conn)
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise _storage_failure(self._path, exc, "commit failed") from exc

    def _row_to_entry(self, row: tuple[Any, ...]) -> LedgerEntry:
        entry_id, run_id, round_, purpose, event_json, eps_after, status, created_at = row
        try:
            purpose_ = ChargePurpose(purpose)
            event = event_from_json(json.loads(event_json))
            status_ = ChargeStatus(status)
        except (ValueError, TypeError) as exc:  # json errors, unknown statuses and purposes
            raise LedgerError(f"{self._path}: corrupt charge {entry_id}: {exc}") from exc
        if not isinstance(event, (DpSgdRound, GaussianRelease)) or not isinstance(
            event, purpose_.event_type
        ):
            raise LedgerError(
                f"{self._path}: corrupt charge {entry_id}: a {purpose_.value} charge "
                f"holds {event!r}"
            )
        return LedgerEntry(
            entry_id, run_id, round_, event, eps_after, status_, created_at, purpose_
        )

    def _read_entries(self, conn: sqlite3.Connection) -> list[LedgerEntry]:
        rows = conn.execute(
            "SELECT entry_id, run_id, round, purpose, event, epsilon_after, status, created_at "
            "FROM charges ORDER BY entry_id"
        ).fetchall()
        return [self._row_to_entry(r) for r in rows]

    def _epsilon(self, events: list[LedgerEvent]) -> float:
        accountant = PrivacyAccountant(AccountantKind.PLD)
        for event in events:
            accountant.compose(event)
        return accountant.epsilon(self._budget.delta)

    def _spent(self, entries: list[LedgerEntry]) -> float:
        # Entries are never deleted nor changed (only their status), so the count and
        # the last id identify the set of charged events.
        key = (len(entries), entries[-1].entry_id if entries else 0)
        if self._spent_cache is None or self._spent_cache[0] != key:
            self._spent_cache = (key, self._epsilon([e.event for e in entries]))
        return self._spent_cache[1]

    # ----------------------------------------------------------------------- queries

    def entries(self) -> list[LedgerEntry]:
        with self._transaction(immediate=False) as conn:
            return self._read_entries(conn)

    def spent_epsilon(self) -> float:
        """ε spent so far (PLD at the budget's δ over every charge); 0.0 when none."""
        return self._spent(self.entries())

    def epsilon_if_charged(self, event: LedgerEvent) -> float:
        """ε the silo would have spent after ``event``; writes nothing."""
        if not isinstance(event, (DpSgdRound, GaussianRelease)):
            raise ConfigError(f"not a ledger event: {event!r}")
        return self._epsilon([*(e.event for e in self.entries()), event])

    def find(
        self, run_id: str, round: int, purpose: ChargePurpose = ChargePurpose.TRAINING
    ) -> LedgerEntry | None:
        """The charge of ``(run_id, round, purpose)``, if there is one."""
        with self._transaction(immediate=False) as conn:
            row = conn.execute(
                "SELECT entry_id, run_id, round, purpose, event, epsilon_after, status, "
                "created_at FROM charges WHERE run_id = ? AND round = ? AND purpose = ?",
                (run_id, round, ChargePurpose(purpose).value),
            ).fetchone()
        return None if row is None else self._row_to_entry(row)

    # ----------------------------------------------------------------------- charging

    def charge(
        self,
        run_id: str,
        round: int,
        event: LedgerEvent,
        purpose: ChargePurpose = ChargePurpose.TRAINING,
    ) -> LedgerEntry:
        """Durably charge one round (or one release) before it is trained (or released).

        Raises:
            BudgetExhaustedError: the charge would take the silo past its budget;
                nothing is written.
            LedgerError: ``(run_id, round, purpose)`` was already charged (a replayed
                round is never trained twice, a replayed query never released twice),
                or the file cannot be written.
        """
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
        positive_int("round", round, allow_zero=True)
        if not isinstance(purpose, ChargePurpose):
            raise ConfigError(f"purpose must be a ChargePurpose, got {purpose!r}")
        _check_event(event, purpose)
        what = "round" if purpose is ChargePurpose.TRAINING else f"{purpose.value} release"
        with self._transaction(immediate=True) as conn:
            existing = conn.execute(
                "SELECT entry_id, status FROM charges WHERE run_id = ? AND round = ? "
                "AND purpose = ?",
                (run_id, round, purpose.value),
            ).fetchone()
            if existing is not None:
                raise LedgerError(
                    f"{what} {round} of run {run_id!r} was already charged (entry "
                    f"{existing[0]}, {existing[1]}); a replayed round is never trained twice "
                    f"and a replayed query never released twice"
                )
            entries = self._read_entries(conn)
            after = self._check_budget(entries, event, f"{what} {round} of run {run_id!r}")
            now = utc_now()
            cursor = conn.execute(
                "INSERT INTO charges (run_id, round, purpose, event, epsilon_after, status, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    round,
                    purpose.value,
                    json.dumps(event.to_json()),
                    after,
                    ChargeStatus.CHARGED.value,
                    now,
                    now,
                ),
            )
            entry_id = cursor.lastrowid
            if entry_id is None:  # pragma: no cover - sqlite always sets it after INSERT
                raise LedgerError(f"{self._path}: insert returned no row id")
        # The write lock was held from the read to the commit, so these are all entries.
        self._spent_cache = ((len(entries) + 1, entry_id), after)
        return LedgerEntry(
            entry_id, run_id, round, event, after, ChargeStatus.CHARGED, now, purpose
        )

    def _check_budget(self, entries: list[LedgerEntry], event: LedgerEvent, what: str) -> float:
        """ε after ``event`` on top of ``entries``; BudgetExhaustedError past the budget."""
        after = self._epsilon([*(e.event for e in entries), event])
        if not after <= self._budget.epsilon:
            spent = self._spent(entries)
            alone = self._epsilon([event])
            raise BudgetExhaustedError(
                f"silo {self._silo_id!r}: {what} would cost "
                f"ε={alone:.4g} on its own and take the spend from ε={spent:.4g} to "
                f"ε={after:.4g}, past the budget ε={self._budget.epsilon:g} "
                f"(δ={self._budget.delta:g}); nothing was charged"
            )
        return after

    def check_affordable(self, event: LedgerEvent, what: str) -> float:
        """The ε ``event`` would take the silo to; raise BudgetExhaustedError past the budget.

        Writes nothing: the silo checks before it computes a release, and charges
        (:meth:`charge`, which checks again) only right before the release leaves.
        """
        if not isinstance(event, (DpSgdRound, GaussianRelease)):
            raise ConfigError(f"not a ledger event: {event!r}")
        return self._check_budget(self.entries(), event, what)

    def mark(self, entry_id: int, status: ChargeStatus) -> None:
        """Record how a charged round ended (charged → completed or failed).

        Every status stays charged; a finished entry cannot change to another
        status (``LedgerError``), marking it again with the same status is a no-op.
        """
        if not isinstance(status, ChargeStatus):
            raise ConfigError(f"status must be a ChargeStatus, got {status!r}")
        with self._transaction(immediate=True) as conn:
            row = conn.execute(
                "SELECT status FROM charges WHERE entry_id = ?", (entry_id,)
            ).fetchone()
            if row is None:
                raise LedgerError(f"{self._path}: no charge with entry_id {entry_id!r}")
            current = ChargeStatus(row[0])
            if status not in _TRANSITIONS[current]:
                raise LedgerError(
                    f"charge {entry_id} is {current.value}; it cannot become {status.value}"
                )
            if status is not current:
                conn.execute(
                    "UPDATE charges SET status = ?, updated_at = ? WHERE entry_id = ?",
                    (status.value, utc_now(), entry_id),
                )

    # ----------------------------------------------------------------------- plans

    def plan(self, run_id: str) -> RoundPlan | None:
        with self._transaction(immediate=False) as conn:
            row = conn.execute("SELECT plan FROM plans WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except ValueError as exc:
            raise LedgerError(f"{self._path}: corrupt plan for run {run_id!r}: {exc}") from exc
        return RoundPlan.from_json(data)

    def set_plan(self, run_id: str, plan: RoundPlan) -> None:
        """Fix the plan of ``run_id``; setting the same plan again is a no-op.

        Raises ``LedgerError`` if the run already has a different plan.
        """
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
        if not isinstance(plan, RoundPlan):
            raise ConfigError(f"plan must be a RoundPlan, got {plan!r}")
        with self._transaction(immediate=True) as conn:
            row = conn.execute("SELECT plan FROM plans WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO plans (run_id, plan, created_at) VALUES (?, ?, ?)",
                    (run_id, json.dumps(plan.to_json()), utc_now()),
                )
                return
            try:
                stored = RoundPlan.from_json(json.loads(row[0]))
            except ValueError as exc:
                raise LedgerError(f"{self._path}: corrupt plan for run {run_id!r}") from exc
            if stored != plan:
                raise LedgerError(
                    f"run {run_id!r} already has plan {stored}; refusing to change it to {plan}"
                )

    def head(self) -> LedgerHead:
        """The ledger's id and the head of its charge chain (see :func:`chain_head`)."""
        with self._transaction(immediate=False) as conn:
            (ledger_id,) = conn.execute("SELECT ledger_id FROM silo").fetchone()
            rows = conn.execute(
                "SELECT entry_id, run_id, round, purpose, event, epsilon_after "
                "FROM charges ORDER BY entry_id"
            ).fetchall()
        return LedgerHead(str(ledger_id), tuple(chain_head(str(ledger_id), self._silo_id, rows)))

    def bound_to_log(self) -> bool:
        """Whether a silo log has committed to this ledger (see fedguard.client.ledger_guard)."""
        with self._transaction(immediate=False) as conn:
            (bound,) = conn.execute("SELECT log_bound FROM silo").fetchone()
        return bool(bound)

    def mark_bound_to_log(self) -> None:
        """Record that the silo log now commits to this ledger; never undone."""
        with self._transaction(immediate=True) as conn:
            conn.execute("UPDATE silo SET log_bound = 1")

    def check_writable(self) -> None:
        """Raise ``LedgerError`` unless the file takes a write lock (read-only, locked, full)."""
        with self._transaction(immediate=True) as conn:
            conn.execute("UPDATE silo SET silo_id = silo_id")

    # ----------------------------------------------------------------------- lifetime

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self._path)!r}, silo_id={self._silo_id!r})"


def _check_event(event: object, purpose: ChargePurpose) -> None:
    if not isinstance(event, purpose.event_type):
        raise ConfigError(
            f"a silo's ledger charges {purpose.event_type.__name__} events for "
            f"{purpose.value}, got {event!r}"
        )


#: SQLite causes that mean the file itself is damaged (not full, not read-only).
_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "DatabaseError"})


def _storage_failure(path: Path, exc: sqlite3.Error, what: str) -> LedgerStorageError:
    """A ``LedgerStorageError`` naming the ledger file and the SQLite cause."""
    return LedgerStorageError(
        f"privacy ledger {path}: {what}: {describe_cause(exc)}; the transaction was rolled "
        "back, nothing in it was written",
        path=path,
        cause=cause_name(exc),
    )


def _rollback(conn: sqlite3.Connection) -> None:
    # No transaction may be open (it failed to start, or SQLite already rolled back).
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
